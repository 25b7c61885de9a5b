"""Proxy-Tuning's three arms in the miniature world: DreamBooth supervisor, AR on the instance views, AR on
proxy images, for one subject and for several subjects in one model.

Takes the pretrain stage's output for a world with subjects (``jobs/configs/pretrain/proxy.yaml``) and
the arms' settings (``jobs/configs/proxy_arms/mini.yaml``, see
:class:`~stylear_core.miniature.proxy_arms_stage.ProxyArmsStageConfig`). Each subject set runs in its own
Ray task. Gives ``<output_dir>/results.json``, one image grid per set, ``<output_dir>/report.html`` and
``<output_dir>/manifest.json``.

    python -m jobs.proxy_arms --config jobs/configs/proxy_arms/mini.yaml [key=value ...]
"""

from __future__ import annotations

from stylear_core.miniature.proxy_arms_stage import PROXY_ARMS_FORMAT, ProxyArmsStageConfig, run_proxy_arms
from stylear_core.stages import run_stage

Config = ProxyArmsStageConfig
FORMAT = PROXY_ARMS_FORMAT


def main(argv: list[str] | None = None) -> dict:
    """Run the stage (``--config FILE key=value ...``); returns the summary."""
    return run_stage(Config, run_proxy_arms, argv, name="proxy_arms", fmt=FORMAT, description=__doc__)


if __name__ == "__main__":
    main()

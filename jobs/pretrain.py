"""The miniature world: train (or reuse) its VQGAN, style CLIP and judges, then pretrain its base model.

Takes a world config (``jobs/configs/pretrain/mini.yaml``, see
:class:`~stylear_core.miniature.pretrain.PretrainConfig`). The trained parts are cached under
``cache_dir`` and reused by every later run; the base backbone trains on Ray Train + DeepSpeed ZeRO like
SFT does. Gives ``<output_dir>/manifest.json`` whose summary holds the figures (VQGAN PSNR, judge
accuracies, style-encoder separation, base content accuracy) and the ``mini`` model block that the
later stages of the miniature pipeline use.

    python -m jobs.pretrain --config jobs/configs/pretrain/mini.yaml [key=value ...]
"""

from __future__ import annotations

from stylear_core.miniature.pretrain import PRETRAIN_FORMAT, PretrainConfig, run_pretraining
from stylear_core.stages import run_stage

Config = PretrainConfig
FORMAT = PRETRAIN_FORMAT


def main(argv: list[str] | None = None) -> dict:
    """Run the stage (``--config FILE key=value ...``); returns the summary."""
    return run_stage(Config, run_pretraining, argv, name="pretrain", fmt=FORMAT, description=__doc__)


if __name__ == "__main__":
    main()

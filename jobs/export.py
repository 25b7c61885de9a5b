"""Publish a trained adapter for serving: check it on the serving path, copy it under an adapters root.

Takes the adapter a training stage exported (``adapter``, ``stylear.adapter/1``), the name to serve it
under, the evaluation stage's metrics (attached to its manifest) and a serving config to extend. The
adapter's probe is rerun through the serving path (base model + LoRA slot, see
:mod:`stylear_core.adapters.export_stage`) on a Ray task; past ``tolerance`` the stage fails. The
copy under the adapters root appears in one step (:func:`stylear_core.adapters.publish.publish_adapter`).
Gives::

    <output_dir>/adapters/<name>/     the adapter files + manifest (name, source, parity, evaluation)
    <output_dir>/serving.yaml         the serving config with adapters_root and the adapter's model block
                                      (python -m serving --config <output_dir>/serving.yaml)
    <output_dir>/serve_config.yaml    a Ray Serve config for `serve deploy` / `serve run` using it
    <output_dir>/manifest.json

A complete output dir (manifest complete) is skipped on rerun (``force=true`` runs it anyway).

    python -m jobs.export --config jobs/configs/export/tiny.yaml [key=value ...]
"""

from __future__ import annotations

from stylear_core.adapters.export_stage import EXPORT_FORMAT, ExportStageConfig, run_export
from stylear_core.stages import run_stage

FORMAT = EXPORT_FORMAT
Config = ExportStageConfig


def main(argv: list[str] | None = None) -> dict:
    """Run the stage (``--config FILE key=value ...``): check, publish, write the serving configs; the summary."""
    return run_stage(Config, run_export, argv, name="export", fmt=FORMAT, description=__doc__)


if __name__ == "__main__":
    main()

"""Stage 1 of Proxy-Tuning: DreamBooth-LoRA-tune the diffusion supervisor on every subject, in parallel.

Takes a folder of subject sets (``<subjects_dir>/<name>/{*.png, subject.json}``, see
:mod:`stylear_core.proxy.subjects`) and a local supervisor pipeline (SDXL or SD3). Runs one Ray task
per subject (``resources`` each) and gives ``<output_dir>/<subject>/`` with the LoRA
(``pytorch_lora_weights.safetensors``, loadable with ``pipe.load_lora_weights``) and a manifest, plus
``<output_dir>/manifest.json`` listing the subjects. Subjects already complete are skipped on rerun.

    python -m jobs.dreambooth --config jobs/configs/dreambooth/tiny.yaml [key=value ...]
"""

from __future__ import annotations

from stylear_core.proxy.dreambooth_stage import (
    DREAMBOOTH_FORMAT,
    DreamBoothStageConfig,
    run_dreambooth_stage,
    skipped_dreambooth_summary,
)
from stylear_core.stages import run_stage

FORMAT = DREAMBOOTH_FORMAT
Config = DreamBoothStageConfig


def main(argv: list[str] | None = None) -> dict:
    """Run the stage (``--config FILE key=value ...``); gives ``{"subjects": {...}, "errors": {...}}``."""
    return run_stage(
        Config, run_dreambooth_stage, argv, name="dreambooth", fmt=FORMAT, description=__doc__,
        writes_manifest=True, on_skip=skipped_dreambooth_summary,
    )  # fmt: skip


if __name__ == "__main__":
    main()

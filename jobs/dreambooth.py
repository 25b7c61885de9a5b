"""Stage 1 of Proxy-Tuning: DreamBooth-LoRA-tune the diffusion supervisor on every subject, in parallel.

Takes a folder of subject sets (``<subjects_dir>/<name>/{*.png, subject.json}``, see
:mod:`stylear_core.proxy.subjects`) and a local supervisor pipeline (SDXL or SD3). Runs one Ray task
per subject (``gpus_per_subject`` GPUs each) and gives ``<output_dir>/<subject>/`` with the LoRA
(``pytorch_lora_weights.safetensors``, loadable with ``pipe.load_lora_weights``) and a manifest, plus
``<output_dir>/manifest.json`` listing the subjects. Subjects already complete are skipped on rerun.

    python -m jobs.dreambooth --config jobs/configs/dreambooth/tiny.yaml [key=value ...]
"""

from __future__ import annotations

from stylear_core.config import parse_job_args
from stylear_core.proxy.dreambooth_stage import (
    DREAMBOOTH_FORMAT,
    DreamBoothStageConfig,
    prepare_dreambooth,
    run_dreambooth_subjects,
)
from stylear_core.ray_connection import connect_ray

FORMAT = DREAMBOOTH_FORMAT
Config = DreamBoothStageConfig


def main(argv: list[str] | None = None) -> dict:
    """Run the stage (``--config FILE key=value ...``); gives ``{"subjects": {...}, "errors": {...}}``."""
    cfg = parse_job_args(Config, argv, __doc__)
    plan = prepare_dreambooth(cfg)
    connect_ray(cfg.ray_address, log_prefix="[dreambooth]")

    def report(name: str, status: str) -> None:
        print(f"[dreambooth] {name}: {status}", flush=True)

    return run_dreambooth_subjects(plan, report)


if __name__ == "__main__":
    main()

"""StyleAR style-token SFT on Ray Train + DeepSpeed ZeRO: token shards in, a serving adapter out.

Takes token shards (``stylear.token_shards/2`` parquet; style tokens come from each row's own
target image) and the model block; trains the resampler and LoRA (or the whole backbone) with
``train.zero_stage`` 2 or 3 on ``ray.num_workers`` workers, checkpointing every
``train.checkpoint_every`` steps (a rerun with the same ``ray.storage_path`` + ``ray.name`` resumes).
Gives ``<output_dir>/adapter/`` (LoRA + resampler safetensors, probe, manifest),
``<output_dir>/metrics.jsonl`` and ``<output_dir>/manifest.json``.
A complete output dir (manifest complete) is skipped on rerun (``force=true`` runs it anyway).

    python -m jobs.train_style --config jobs/configs/train_style/tiny.yaml [key=value ...]
"""

from __future__ import annotations

from stylear_core.stages import run_stage
from stylear_core.training.stages import (
    TRAIN_STYLE_FORMAT,
    SFTDataConfig,
    StyleTrainConfig,
    run_style_training,
)

FORMAT = TRAIN_STYLE_FORMAT
Config = StyleTrainConfig
__all__ = ["FORMAT", "Config", "SFTDataConfig", "main"]


def main(argv: list[str] | None = None) -> dict:
    """Run the SFT stage from ``argv`` (``--config FILE key=value ...``); returns its summary."""
    return run_stage(Config, run_style_training, argv, name="train_style", fmt=FORMAT, description=__doc__)


if __name__ == "__main__":
    main()

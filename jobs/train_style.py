"""StyleAR style-token SFT on Ray Train + DeepSpeed ZeRO: token shards in, a serving adapter out.

Takes token shards (``stylear.token_shards/1`` parquet; style tokens come from each row's own
target image) and the model block; trains the resampler and LoRA (or the whole backbone) with
``train.zero_stage`` 2 or 3 on ``ray.num_workers`` workers, checkpointing every
``train.checkpoint_every`` steps (a rerun with the same ``ray.storage_path`` + ``ray.name`` resumes).
Gives ``<output_dir>/adapter/`` (LoRA + resampler safetensors, probe, manifest),
``<output_dir>/metrics.jsonl`` and ``<output_dir>/manifest.json``.

    python -m jobs.train_style --config jobs/configs/train_style/tiny.yaml [key=value ...]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from stylear_core.config import option, parse_job_args, to_dict
from stylear_core.models.presets import ModelConfig
from stylear_core.ray_connection import connect_ray
from stylear_core.runs import write_manifest
from stylear_core.training.batches import TOKEN_SHARD_COLUMNS, read_parquet_dataset
from stylear_core.training.export import export_training_outcome
from stylear_core.training.loop import RayTrainConfig, TrainLoopConfig, run_training
from stylear_core.training.objectives import StyleSFTObjective
from stylear_core.training.synthetic_shards import write_synthetic_token_shards

FORMAT = "stylear.train_style/1"


@dataclass
class SFTDataConfig:
    """The training rows."""

    token_shards: str = option("{run_dir}/curate/tokens", "token-shard parquet file or directory")
    style_source: Literal["vq_decode", "image"] = option(
        "vq_decode", "style image = the target decoded from its VQ tokens, or an `image` PNG column"
    )
    limit: int = option(0, "use only the first N rows (0 = all)")
    synthetic_rows: int = option(0, "write N synthetic rows to an empty token_shards dir first (demo)")
    cache: bool = option(False, "hold the rows in the object store after the first read (small data)")


@dataclass
class Config:
    """Data, model, loop and cluster of the SFT stage."""

    output_dir: str = option("runs/tiny/train_style", "stage output directory")
    run_dir: str = option("runs/tiny", "the pipeline run; paths may say {run_dir}")
    data: SFTDataConfig = option(SFTDataConfig, "training rows")
    model: ModelConfig = option(ModelConfig, "the StyleAR model to train")
    train: TrainLoopConfig = option(TrainLoopConfig, "steps, batches, ZeRO, checkpoints")
    ray: RayTrainConfig = option(RayTrainConfig, "workers, storage, failures")


def main(argv: list[str] | None = None) -> dict:
    """Run the SFT stage from ``argv`` (``--config FILE key=value ...``); returns its summary."""
    cfg = parse_job_args(Config, argv, __doc__)
    shards = Path(cfg.data.token_shards.format(run_dir=cfg.run_dir)).resolve()
    if cfg.data.synthetic_rows and not any(shards.glob("**/*.parquet")):
        write_synthetic_token_shards(shards, cfg.model, cfg.data.synthetic_rows)
    connect_ray(cfg.ray.address, log_prefix="[train_style]")
    columns = [*TOKEN_SHARD_COLUMNS, *(["image"] if cfg.data.style_source == "image" else [])]
    dataset = read_parquet_dataset(str(shards), columns, cfg.data.limit or None, cfg.data.cache)
    objective = StyleSFTObjective(cfg.model, cfg.data.style_source)
    out = Path(cfg.output_dir.format(run_dir=cfg.run_dir)).resolve()
    outcome = run_training(objective, cfg.train, cfg.ray, {"train": dataset}, out)
    adapter = export_training_outcome(outcome.checkpoint, out, cfg.model, outcome.metrics, kind="style")
    summary = {
        "adapter": str(adapter),
        "checkpoint": outcome.checkpoint.path if outcome.checkpoint else None,
        "steps": int(outcome.metrics.get("step", 0)),
        "final_loss": outcome.metrics.get("loss"),
        "metrics_log": str(outcome.metrics_log),
    }
    write_manifest(out, FORMAT, status="complete", config=to_dict(cfg), summary=summary)
    print(f"[train_style] {summary}", flush=True)
    return summary


if __name__ == "__main__":
    main()

"""DPO post-training of the StyleAR SFT model on preference pairs, on Ray Train + DeepSpeed ZeRO.

Takes preference pairs (``stylear.preference_pairs/1`` parquet) and the SFT artefact (its manifest
names the model block unless ``model`` is set). The policy LoRA starts from the SFT LoRA and trains
with the sigmoid DPO loss (``dpo.beta``) on summed image-token log-probs, against a frozen reference
adapter holding the SFT factors on the same base weights. Gives ``<output_dir>/adapter/`` (the DPO
policy's LoRA + resampler, probe, manifest), ``<output_dir>/metrics.jsonl`` (loss, reward margin,
accuracy, ...) and ``<output_dir>/manifest.json``.

    python -m jobs.train_dpo --config jobs/configs/train_dpo/tiny.yaml [key=value ...]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stylear_core.config import from_dict, option, parse_job_args, to_dict
from stylear_core.models.presets import ModelConfig
from stylear_core.ray_connection import connect_ray
from stylear_core.runs import read_manifest, write_manifest
from stylear_core.training.batches import read_parquet_dataset
from stylear_core.training.export import export_training_outcome
from stylear_core.training.loop import RayTrainConfig, TrainLoopConfig, run_training
from stylear_core.training.objectives import StyleDPOObjective

FORMAT = "stylear.train_dpo/1"


@dataclass
class DPOLossConfig:
    """The DPO loss (Rafailov et al. 2023)."""

    beta: float = option(0.1, "KL-penalty temperature beta")
    label_smoothing: float = option(0.0, "conservative-DPO label noise eps in [0, 0.5)")
    noise_strength: float = option(0.0, "style-token noise for policy and reference log-probs")


@dataclass
class Config:
    """Pairs, SFT artefact, loss, loop and cluster of the DPO stage."""

    output_dir: str = option("runs/tiny/train_dpo", "stage output directory")
    run_dir: str = option("runs/tiny", "the pipeline run; paths may say {run_dir}")
    pairs: str = option("{run_dir}/make_preferences/pairs", "preference-pair parquet file or directory")
    sft_adapter: str = option("{run_dir}/train_style/adapter", "the SFT artefact: policy init and reference")
    model: ModelConfig | None = option(None, "model block (default: the one in the SFT adapter's manifest)")
    cache: bool = option(False, "hold the pairs in the object store after the first read (small data)")
    dpo: DPOLossConfig = option(DPOLossConfig, "the DPO loss")
    train: TrainLoopConfig = option(TrainLoopConfig, "steps, batches, ZeRO, checkpoints")
    ray: RayTrainConfig = option(RayTrainConfig, "workers, storage, failures")


def main(argv: list[str] | None = None) -> dict:
    """Run the DPO stage from ``argv`` (``--config FILE key=value ...``); returns its summary."""
    cfg = parse_job_args(Config, argv, __doc__)

    adapter = str(Path(cfg.sft_adapter.format(run_dir=cfg.run_dir)).resolve())
    model = cfg.model or from_dict(ModelConfig, (read_manifest(adapter) or {})["model_config"])
    connect_ray(cfg.ray.address, log_prefix="[train_dpo]")
    pairs = read_parquet_dataset(str(Path(cfg.pairs.format(run_dir=cfg.run_dir)).resolve()), cache=cfg.cache)
    objective = StyleDPOObjective(
        model, adapter, cfg.dpo.beta, cfg.dpo.label_smoothing, cfg.dpo.noise_strength
    )
    out = Path(cfg.output_dir.format(run_dir=cfg.run_dir)).resolve()
    outcome = run_training(objective, cfg.train, cfg.ray, {"train": pairs}, out)
    exported = export_training_outcome(
        outcome.checkpoint, out, model, outcome.metrics, kind="style", sft_adapter=adapter, beta=cfg.dpo.beta
    )
    keys = ("step", "loss", "reward_margin", "accuracy")
    summary = {"adapter": str(exported), **{k: outcome.metrics.get(k) for k in keys}}
    summary["metrics_log"] = str(outcome.metrics_log)
    write_manifest(out, FORMAT, status="complete", config=to_dict(cfg), summary=summary)
    print(f"[train_dpo] {summary}", flush=True)
    return summary


if __name__ == "__main__":
    main()

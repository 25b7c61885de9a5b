"""The two StyleAR training stages as library code: style-token SFT and DPO post-training.

* :func:`run_style_training` (:class:`StyleTrainConfig`): token shards in, the resampler and LoRA (or the
  whole backbone) trained with :class:`~stylear_core.training.objectives.StyleSFTObjective`, a serving
  adapter out.
* :func:`run_dpo_training` (:class:`DPOTrainConfig`): preference pairs in, the SFT LoRA trained further
  with the sigmoid DPO loss (:class:`~stylear_core.training.objectives.StyleDPOObjective`) against the
  frozen SFT reference: its log-probs stored with the pairs (scored once, before training, where
  ``dpo.reference_logps: precompute`` finds them missing) or a frozen reference adapter run every step.

Both run on Ray Train + DeepSpeed ZeRO (:func:`~stylear_core.training.loop.run_training`) on the
attached cluster and give ``<output_dir>/adapter/`` and ``<output_dir>/metrics.jsonl``; a rerun with the
same ``ray.storage_path`` + ``ray.name`` resumes. ``jobs/train_style.py`` and ``jobs/train_dpo.py`` run
them through :func:`~stylear_core.stages.run_stage`, which writes the stage manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from stylear_core.adapters.format import adapter_model_config
from stylear_core.config import ConfigError, option
from stylear_core.data.style_features import (
    FEATURES_COLUMN,
    KEY_COLUMN,
    check_feature_files,
    style_encoder_digest,
)
from stylear_core.models.presets import ModelConfig
from stylear_core.preferences.reference import (
    precompute_reference_log_probs,
    reference_digest,
    reference_logps_state,
)
from stylear_core.stages import StageConfig
from stylear_core.training.batches import TOKEN_SHARD_COLUMNS, read_parquet_dataset
from stylear_core.training.export import export_training_outcome
from stylear_core.training.loop import RayTrainConfig, TrainLoopConfig, run_training
from stylear_core.training.objectives import StyleDPOObjective, StyleSFTObjective
from stylear_core.training.synthetic_shards import write_synthetic_token_shards

TRAIN_STYLE_FORMAT = "stylear.train_style/1"
TRAIN_DPO_FORMAT = "stylear.train_dpo/1"


@dataclass
class SFTDataConfig:
    """The training rows."""

    token_shards: str = option("{run_dir}/curate/tokens", "token-shard parquet file or directory")
    style_source: Literal["vq_decode", "image", "features"] = option(
        "vq_decode",
        "style image = the target decoded from its VQ tokens, or an `image` PNG column; features = the "
        "frozen CLIP features of either, precomputed once by curation (tokenize.style_features): no CLIP "
        "or VQGAN runs in training",
    )
    limit: int = option(0, "use only the first N rows (0 = all)")
    shuffle_files: bool = option(
        True,
        "read the shard files in an order shuffled by train.seed, the same in every epoch and attempt "
        "(curation writes the raw pairs' files, then the stylized pairs'); false: path order",
    )
    synthetic_rows: int = option(0, "write N synthetic rows to an empty token_shards dir first (demo)")
    cache: bool = option(False, "hold the rows in the object store after the first read (small data)")


@dataclass
class StyleTrainConfig(StageConfig):
    """Data, model, loop and cluster of the SFT stage."""

    output_dir: str = option("runs/tiny/train_style", "stage output directory")
    data: SFTDataConfig = option(SFTDataConfig, "training rows")
    model: ModelConfig = option(ModelConfig, "the StyleAR model to train")
    train: TrainLoopConfig = option(TrainLoopConfig, "steps, batches, ZeRO, checkpoints")
    ray: RayTrainConfig = option(RayTrainConfig, "workers, storage, failures")


def run_style_training(cfg: StyleTrainConfig) -> dict[str, Any]:
    """Train and export the style adapter of ``cfg`` on the attached cluster; returns the stage summary."""
    shards = Path(cfg.path(cfg.data.token_shards))
    if cfg.data.synthetic_rows and not any(shards.glob("**/*.parquet")):
        write_synthetic_token_shards(shards, cfg.model, cfg.data.synthetic_rows)
    source = cfg.data.style_source
    columns = [
        *TOKEN_SHARD_COLUMNS,
        *{"image": ["image"], "features": [FEATURES_COLUMN, KEY_COLUMN]}.get(source, []),
    ]
    shuffle_seed = cfg.train.seed if cfg.data.shuffle_files else None
    dataset = read_parquet_dataset(str(shards), columns, cfg.data.limit or None, cfg.data.cache, shuffle_seed)
    digest = None
    if source == "features":  # before any worker starts: rows without features, or another encoder's
        digest = style_encoder_digest(cfg.model)
        check_feature_files(str(shards), digest)
    objective = StyleSFTObjective(cfg.model, source, encoder_digest=digest)
    out = cfg.stage_dir
    outcome = run_training(objective, cfg.train, cfg.ray, {"train": dataset}, out)
    adapter = export_training_outcome(outcome.checkpoint, out, cfg.model, outcome.metrics, kind="style")
    return {
        "adapter": str(adapter),
        "checkpoint": outcome.checkpoint.path if outcome.checkpoint else None,
        "steps": int(outcome.metrics.get("step", 0)),
        "final_loss": outcome.metrics.get("loss"),
        "metrics_log": str(outcome.metrics_log),
    }


@dataclass
class DPOLossConfig:
    """The DPO loss (Rafailov et al. 2023)."""

    beta: float = option(0.1, "KL-penalty temperature beta")
    label_smoothing: float = option(0.0, "conservative-DPO label noise eps in [0, 0.5)")
    noise_strength: float = option(0.0, "style-token noise for policy and reference log-probs")
    reference_logps: Literal["auto", "cached", "live", "precompute"] = option(
        "auto",
        "reference log-probs: cached (stored with the pairs for this SFT adapter and noise strength, else "
        "refuse), live (a frozen reference adapter run every step), auto (cached if stored, else live), "
        "precompute (score the pairs once before training where missing or stale, then cached)",
    )


@dataclass
class DPOTrainConfig(StageConfig):
    """Pairs, SFT artefact, loss, loop and cluster of the DPO stage."""

    output_dir: str = option("runs/tiny/train_dpo", "stage output directory")
    pairs: str = option("{run_dir}/make_preferences/pairs", "preference-pair parquet file or directory")
    sft_adapter: str = option("{run_dir}/train_style/adapter", "the SFT artefact: policy init and reference")
    model: ModelConfig | None = option(None, "model block (default: the one in the SFT adapter's manifest)")
    cache: bool = option(False, "hold the pairs in the object store after the first read (small data)")
    dpo: DPOLossConfig = option(DPOLossConfig, "the DPO loss")
    train: TrainLoopConfig = option(TrainLoopConfig, "steps, batches, ZeRO, checkpoints")
    ray: RayTrainConfig = option(RayTrainConfig, "workers, storage, failures")


def run_dpo_training(cfg: DPOTrainConfig) -> dict[str, Any]:
    """DPO-train the SFT adapter of ``cfg`` on its pairs on the attached cluster; returns the stage summary."""
    adapter = cfg.path(cfg.sft_adapter)
    model = adapter_model_config(adapter, cfg.model)
    out = cfg.stage_dir
    pairs_path, reference_logps = resolve_reference_logps(cfg, model, adapter)
    pairs = read_parquet_dataset(pairs_path, cache=cfg.cache)
    objective = StyleDPOObjective(
        model,
        adapter,
        cfg.dpo.beta,
        cfg.dpo.label_smoothing,
        cfg.dpo.noise_strength,
        reference_logps=reference_logps,
    )
    outcome = run_training(objective, cfg.train, cfg.ray, {"train": pairs}, out)
    exported = export_training_outcome(
        outcome.checkpoint, out, model, outcome.metrics, kind="style", sft_adapter=adapter, beta=cfg.dpo.beta
    )
    keys = ("step", "loss", "reward_margin", "accuracy")
    summary = {"adapter": str(exported), **{k: outcome.metrics.get(k) for k in keys}}
    summary["metrics_log"] = str(outcome.metrics_log)
    summary.update(reference_logps=reference_logps, pairs_read=pairs_path)
    return summary


def resolve_reference_logps(cfg: DPOTrainConfig, model: ModelConfig, adapter: str) -> tuple[str, str]:
    """The pairs to train on and the objective's ``reference_logps`` (``cached`` or ``live``) for
    ``cfg.dpo.reference_logps``; ``precompute`` scores pairs without valid stored log-probs into
    ``<output_dir>/reference_logps/<digest>/`` (kept: a rerun or resume reuses them) before training."""
    pairs = cfg.path(cfg.pairs)
    mode = cfg.dpo.reference_logps
    if mode == "live":
        return pairs, "live"
    digest = reference_digest(adapter, model, cfg.dpo.noise_strength)
    state, why = reference_logps_state(pairs, digest)
    if state == "valid" or mode == "auto":
        return pairs, "cached" if state == "valid" else "live"
    if mode == "cached":
        raise ConfigError(
            f"dpo.reference_logps: cached, but the pairs hold no reference log-probs for this SFT adapter "
            f"and dpo.noise_strength ({why}); use precompute, or live"
        )
    w = cfg.ray.worker
    scored = precompute_reference_log_probs(
        pairs,
        model,
        adapter,
        cfg.dpo.noise_strength,
        cfg.stage_dir / "reference_logps",
        actors=cfg.ray.num_workers,
        gpus_per_actor=w.gpus,
        cpus_per_actor=w.cpus,
    )
    return str(scored), "cached"


__all__ = [
    "TRAIN_DPO_FORMAT",
    "TRAIN_STYLE_FORMAT",
    "DPOLossConfig",
    "DPOTrainConfig",
    "SFTDataConfig",
    "StyleTrainConfig",
    "resolve_reference_logps",
    "run_dpo_training",
    "run_style_training",
]

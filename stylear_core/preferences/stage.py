"""The preference-pair stage: K samples per held (prompt, style reference) with the SFT model, ranked by CLIP
(or, in the miniature world, by colour-palette similarity to the reference: ``sampling.style_scorer``).

:func:`run_preference_stage` takes a :class:`PreferenceStageConfig`: the SFT artefact (``sft_adapter``;
its manifest names the model block unless ``model`` is set) and request rows (``requests``: parquet with
``id, prompt, style_image`` and optionally ``style_ref``; or ``synthetic_requests`` procedural rows, of the
procedural style set or of the miniature world's training styles: ``synthetic_set``). The
sampler runs as Ray Data actors (``resources`` each) and writes ``<output_dir>/pairs/*.parquet``
(``stylear.preference_pairs/1``: prompt, style, chosen and rejected tokens, scores and, unless
``reference_logps`` is off, the SFT model's log-probs of both for DPO's reference at
``reference_noise_strength``, which must be the DPO stage's ``dpo.noise_strength`` for DPO to use them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import pyarrow.parquet as pq

from stylear_core.adapters.format import adapter_model_config
from stylear_core.config import Resources, option
from stylear_core.models.presets import ModelConfig
from stylear_core.preferences.pairs import (
    PreferenceSamplingConfig,
    make_preference_pairs,
    synthetic_style_requests,
    world_style_requests,
)
from stylear_core.stages import StageConfig

PREFERENCES_FORMAT = "stylear.preferences/1"


@dataclass
class PreferenceStageConfig(StageConfig):
    """Inputs, sampling and Ray Data actors of the preference stage."""

    RENAMED_KEYS: ClassVar[dict] = {
        **StageConfig.RENAMED_KEYS,
        "gpus_per_actor": "resources.gpus",
        "cpus_per_actor": "resources.cpus",
    }

    output_dir: str = option("runs/tiny/make_preferences", "stage output directory")
    sft_adapter: str = option("{run_dir}/train_style/adapter", "the SFT artefact directory")
    model: ModelConfig | None = option(None, "model block (default: the one in the SFT adapter's manifest)")
    requests: str = option("", "parquet of held (prompt, style reference) rows; empty: synthetic")
    synthetic_requests: int = option(0, "procedural request rows to use when `requests` is empty")
    synthetic_set: Literal["procedural", "world"] = option(
        "procedural",
        "what those rows are: the procedural style set's, or the miniature world's (training styles only)",
    )
    synthetic_seed: int = option(1, "seed of the procedural rows (not the training data's, to hold them out)")
    sampling: PreferenceSamplingConfig = option(PreferenceSamplingConfig, "sampling and ranking")
    actors: int = option(1, "sampler actors (one model each)")
    resources: Resources = option(Resources, "CPUs and GPUs of each sampler actor")
    batch_size: int = option(4, "request rows per actor call")
    reference_logps: bool = option(True, "store the SFT model's log-probs of each pair (DPO's reference)")
    reference_noise_strength: float = option(
        0.0, "style-noise strength of those log-probs: the DPO stage's dpo.noise_strength"
    )


def run_preference_stage(cfg: PreferenceStageConfig) -> dict[str, Any]:
    """Sample and rank the pairs of ``cfg`` on the attached cluster, write them; returns the stage summary."""
    import ray

    adapter = cfg.path(cfg.sft_adapter)
    model = adapter_model_config(adapter, cfg.model)
    if cfg.requests:
        requests = ray.data.read_parquet(cfg.path(cfg.requests))
    else:
        if cfg.synthetic_set == "world":
            rows = world_style_requests(cfg.synthetic_requests, cfg.synthetic_seed)
        else:
            rows = synthetic_style_requests(cfg.synthetic_requests, cfg.synthetic_seed, model.image_size)
        requests = ray.data.from_items(rows)
    out = cfg.stage_dir
    pairs = make_preference_pairs(
        requests,
        model,
        adapter,
        cfg.sampling,
        cfg.actors,
        cfg.resources.gpus,
        cfg.resources.cpus,
        cfg.batch_size,
        cfg.reference_noise_strength if cfg.reference_logps else None,
    )
    pairs.write_parquet(str(out / "pairs"))
    table = pq.read_table(out / "pairs")
    return {
        "pairs": table.num_rows,
        "requests": requests.count(),
        "mean_chosen_score": float(table["chosen_score"].to_numpy().mean()) if table.num_rows else None,
        "mean_rejected_score": float(table["rejected_score"].to_numpy().mean()) if table.num_rows else None,
        "pairs_dir": str(out / "pairs"),
    }


__all__ = ["PREFERENCES_FORMAT", "PreferenceStageConfig", "run_preference_stage"]

"""Preference pairs for DPO: sample K images per held (prompt, style reference) with the SFT model, rank by CLIP.

Takes the SFT artefact (``sft_adapter``; its manifest names the model block unless ``model`` is set)
and request rows (``requests``: parquet with ``id, prompt, style_image`` and optionally
``style_ref``; or ``synthetic_requests`` procedural rows). Runs the sampler as Ray Data actors and
gives ``<output_dir>/pairs/*.parquet`` (``stylear.preference_pairs/1``: prompt, style, chosen and
rejected tokens, scores) and ``<output_dir>/manifest.json``.

    python -m jobs.make_preferences --config jobs/configs/make_preferences/tiny.yaml [key=value ...]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from stylear_core.config import from_dict, option, parse_job_args, to_dict
from stylear_core.models.presets import ModelConfig
from stylear_core.ray_connection import connect_ray
from stylear_core.runs import read_manifest, write_manifest
from stylear_core.training.preferences import (
    PreferenceSamplingConfig,
    make_preference_pairs,
    synthetic_style_requests,
)

FORMAT = "stylear.preferences/1"


@dataclass
class Config:
    """Inputs, sampling and Ray Data actors of the preference stage."""

    output_dir: str = option("runs/tiny/make_preferences", "stage output directory")
    run_dir: str = option("runs/tiny", "the pipeline run; paths may say {run_dir}")
    sft_adapter: str = option("{run_dir}/train_style/adapter", "the SFT artefact directory")
    model: ModelConfig | None = option(None, "model block (default: the one in the SFT adapter's manifest)")
    requests: str = option("", "parquet of held (prompt, style reference) rows; empty: synthetic")
    synthetic_requests: int = option(0, "procedural request rows to use when `requests` is empty")
    synthetic_seed: int = option(1, "seed of the procedural rows (not the training data's, to hold them out)")
    sampling: PreferenceSamplingConfig = option(PreferenceSamplingConfig, "sampling and ranking")
    actors: int = option(1, "sampler actors (one model each)")
    gpus_per_actor: float = option(0.0, "GPUs per sampler actor")
    cpus_per_actor: float = option(1.0, "CPUs per sampler actor")
    batch_size: int = option(4, "request rows per actor call")
    ray_address: str = option(
        "auto",
        "Ray cluster: auto (RAY_ADDRESS, else the last `ray start` here), local (private instance) or host:port",
    )


def main(argv: list[str] | None = None) -> dict:
    """Run the preference stage from ``argv`` (``--config FILE key=value ...``); returns its summary."""
    cfg = parse_job_args(Config, argv, __doc__)
    import ray

    adapter = str(Path(cfg.sft_adapter.format(run_dir=cfg.run_dir)).resolve())
    model = cfg.model or from_dict(ModelConfig, (read_manifest(adapter) or {})["model_config"])
    connect_ray(cfg.ray_address, log_prefix="[make_preferences]")
    if cfg.requests:
        requests = ray.data.read_parquet(str(Path(cfg.requests.format(run_dir=cfg.run_dir)).resolve()))
    else:
        rows = synthetic_style_requests(cfg.synthetic_requests, cfg.synthetic_seed, model.image_size)
        requests = ray.data.from_items(rows)
    out = Path(cfg.output_dir.format(run_dir=cfg.run_dir)).resolve()
    pairs = make_preference_pairs(
        requests,
        model,
        adapter,
        cfg.sampling,
        cfg.actors,
        cfg.gpus_per_actor,
        cfg.cpus_per_actor,
        cfg.batch_size,
    )
    pairs.write_parquet(str(out / "pairs"))
    table = pq.read_table(out / "pairs")
    summary = {
        "pairs": table.num_rows,
        "requests": requests.count(),
        "mean_chosen_score": float(table["chosen_score"].to_numpy().mean()) if table.num_rows else None,
        "mean_rejected_score": float(table["rejected_score"].to_numpy().mean()) if table.num_rows else None,
        "pairs_dir": str(out / "pairs"),
    }
    write_manifest(out, FORMAT, status="complete", config=to_dict(cfg), summary=summary)
    print(f"[make_preferences] {summary}", flush=True)
    return summary


if __name__ == "__main__":
    main()

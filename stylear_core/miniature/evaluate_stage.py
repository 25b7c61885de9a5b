"""The ``evaluate_world`` stage: the base, SFT and DPO models judged in the miniature world, plus ablations.

Every variant draws one image per held-out pair (:mod:`stylear_core.miniature.evaluate`) in its own Ray
task; the judges (from the pretrain stage) score style accuracy, content accuracy and leakage. The
ablation rows rerun the tuned variant with the style-token noise at inference set to 0. Gives
``<output_dir>/metrics.json``, ``<output_dir>/grid.png`` (rows: reference, then each variant) and the
stage manifest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image

from stylear_core.adapters.format import adapter_model_config
from stylear_core.config import Resources, option
from stylear_core.miniature.evaluate import WorldEvalConfig, evaluate_variant, held_out_pairs
from stylear_core.miniature.judges import ColourPaletteJudge
from stylear_core.miniature.world import WorldPaths, load_judges, load_vqgan
from stylear_core.models.config import ModelConfig
from stylear_core.stages import StageConfig

EVALUATE_WORLD_FORMAT = "stylear.evaluate_world/1"
BASE = "base"


@dataclass
class WorldEvalStageConfig(StageConfig):
    """Variants, the world's judges, the held-out pairs and the ablations."""

    output_dir: str = option("{run_dir}/evaluate_world", "stage output directory")
    world_dir: str = option("{run_dir}/pretrain/model", "the pretrain stage's published world (judges.pt)")
    adapters: dict[str, str] = option(
        {"sft": "{run_dir}/train_style/adapter", "dpo": "{run_dir}/train_dpo/adapter"},
        "variant name -> adapter dir, judged beside the base model",
    )
    tuned: str = option("sft", "the variant the ablations rerun")
    model: ModelConfig | None = option(None, "model block (default: the one in the tuned adapter's manifest)")
    eval: WorldEvalConfig = option(WorldEvalConfig, "held-out pairs and sampling")
    noise_ablation: list[float] = option(
        [0.0], "inference style-noise strengths the tuned variant reruns with"
    )
    resources: Resources = option(Resources(cpus=1.0), "per variant task")


def _fit_palette_judge(world_dir: str) -> ColourPaletteJudge:
    return ColourPaletteJudge.fit(load_vqgan(WorldPaths(Path(world_dir))))


def _variant_task(
    model: ModelConfig,
    adapter: str | None,
    world_dir: str,
    cfg: WorldEvalConfig,
    pairs,
    palette: ColourPaletteJudge,
):
    return evaluate_variant(model, adapter, load_judges(WorldPaths(Path(world_dir))), cfg, pairs, palette)


def run_world_evaluation(cfg: WorldEvalStageConfig) -> dict[str, Any]:
    """Judge every variant (and the ablations) on Ray tasks; write metrics and the image grid."""
    import ray

    adapters = {name: cfg.path(path) for name, path in cfg.adapters.items()}
    present = {name: path for name, path in adapters.items() if (Path(path) / "manifest.json").is_file()}
    tuned = present.get(cfg.tuned)
    model = cfg.model or adapter_model_config(tuned or next(iter(present.values())), None)
    world_dir = cfg.path(cfg.world_dir)
    runs: dict[str, tuple[str | None, WorldEvalConfig]] = {BASE: (None, cfg.eval)}
    runs.update({name: (path, cfg.eval) for name, path in present.items()})
    if tuned:
        for strength in cfg.noise_ablation:
            sampling = replace(cfg.eval.sampling, noise_strength=strength)
            runs[f"{cfg.tuned}@noise={strength:g}"] = (tuned, replace(cfg.eval, sampling=sampling))
    pairs = held_out_pairs(cfg.eval)  # drawn once: every variant and the grid use the same pairs
    pairs_ref = ray.put(pairs)
    # One palette judge for every variant, fitted once (a VQ round trip of 600 images, about 16 s on 2
    # cores) instead of once per variant task.
    palette_ref = ray.remote(num_cpus=cfg.resources.cpus)(_fit_palette_judge).remote(world_dir)
    task = ray.remote(num_cpus=cfg.resources.cpus, num_gpus=cfg.resources.gpus)(_variant_task)
    refs = {
        name: task.remote(model, path, world_dir, ecfg, pairs_ref, palette_ref)
        for name, (path, ecfg) in runs.items()
    }
    results = {name: ray.get(ref) for name, ref in refs.items()}
    out = cfg.stage_dir
    out.mkdir(parents=True, exist_ok=True)
    metrics = {name: figures for name, (figures, _) in results.items()}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    rows = [[p.reference for p in pairs]] + [images for _, images in results.values()]
    write_grid(rows, out / "grid.png")
    return {"metrics": metrics, "grid": str(out / "grid.png"), "variants": list(runs)}


def write_grid(rows: list[list[Image.Image]], path: Path, scale: int = 2) -> None:
    """Image rows -> one PNG (each image ``scale`` x, nearest neighbour)."""
    side = rows[0][0].width * scale
    grid = Image.new("RGB", (side * max(len(r) for r in rows), side * len(rows)), (255, 255, 255))
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            grid.paste(image.resize((side, side), Image.NEAREST), (x * side, y * side))
    grid.save(path)


__all__ = ["EVALUATE_WORLD_FORMAT", "WorldEvalStageConfig", "run_world_evaluation", "write_grid"]

"""Measuring a model in the miniature world with its judges: style, content and leakage on held-out pairs.

A held-out pair is a prompt (one object) and a style reference: a held-out style drawn on an object of
another kind at another place. For each variant (the base, an SFT or DPO adapter) the generator draws
an image per pair, and the judges say:

- **style accuracy**: the style judge names the reference's palette, texture and stroke;
- **content accuracy**: the content judge finds the prompt's object kind at the prompt's place;
- **leakage**: the content judge finds the reference's object (its kind at its place) in the output.

Chance for style is 1/90 when the judge guesses among all styles (12 held-out ones among them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from stylear_core.config import option
from stylear_core.data.images import to_tensor
from stylear_core.data.synthetic import ALL_STYLES, ContentSpec, StyleSpec
from stylear_core.inference.defaults import SamplingConfig
from stylear_core.miniature.data import HELD_OUT_STYLES, reference_for, scenes
from stylear_core.miniature.judges import ColourPaletteJudge, Judges
from stylear_core.models.config import ModelConfig


@dataclass
class WorldEvalConfig:
    """The held-out pairs and how each variant samples them."""

    prompts_per_style: int = option(3, "held-out prompts per held-out style")
    seed: int = option(11, "seed of the prompts, references and samples")
    sampling: SamplingConfig = option(
        SamplingConfig(cfg_scale=3.0, top_k=64, temperature=1.0, noise_strength=0.2), "sampling"
    )


@dataclass(frozen=True)
class HeldOutPair:
    """A prompt's content, the reference's style, and the reference (its content and image)."""

    content: ContentSpec
    style: StyleSpec
    reference_content: ContentSpec
    reference: Image.Image


def held_out_pairs(cfg: WorldEvalConfig) -> list[HeldOutPair]:
    """``prompts_per_style`` pairs for each held-out style, references unlike their prompts."""
    items = scenes(cfg.seed, cfg.prompts_per_style * len(HELD_OUT_STYLES), HELD_OUT_STYLES, "eval")
    styles = [HELD_OUT_STYLES[i % len(HELD_OUT_STYLES)] for i in range(len(items))]
    pairs = []
    for i, ((content, _), style) in enumerate(zip(items, styles)):
        ref_content, ref_image = reference_for(style, content, cfg.seed * 1000 + i)
        pairs.append(HeldOutPair(content, style, ref_content, ref_image))
    return pairs


def judge_images(
    judges: Judges,
    images: Sequence[Image.Image],
    pairs: Sequence[HeldOutPair],
    palette_judge: ColourPaletteJudge | None = None,
) -> dict[str, float]:
    """Style accuracy, content accuracy and leakage of ``images`` (one per pair); with ``palette_judge``,
    also the palette as read from the colours alone (``palette_colour_accuracy``)."""
    pixels = to_tensor(list(images))
    style = judges.style_correct(pixels, [p.style for p in pairs])
    parts = judges.style_parts_correct(pixels, [p.style for p in pairs]).float().mean(dim=0)
    content = judges.content_correct(pixels, [p.content for p in pairs])
    leaked = judges.leaked(pixels, [p.content for p in pairs], [p.reference_content for p in pairs])
    figures = {
        "style_accuracy": float(style.float().mean()),
        # Each part of the style on its own (chance 1/6, 1/5, 1/3): which parts the style tokens carry.
        "palette_accuracy": float(parts[0]),
        "texture_accuracy": float(parts[1]),
        "stroke_accuracy": float(parts[2]),
        "content_accuracy": float(content.float().mean()),
        "leakage": float(leaked.float().mean()),
        "pairs": len(pairs),
        "chance_style": 1 / len(ALL_STYLES),
    }
    if palette_judge is not None:
        figures["palette_colour_accuracy"] = float(
            palette_judge.correct(pixels, [p.style for p in pairs]).float().mean()
        )
    return figures


def generate_variant(
    model: ModelConfig,
    adapter_dir: str | Path | None,
    pairs: Sequence[HeldOutPair],
    sampling: SamplingConfig,
    seed: int,
) -> list[Image.Image]:
    """One image per pair from ``model`` (+ ``adapter_dir``) with the pair's reference as the style."""
    from stylear_core.inference.generator import StyleARGenerator

    generator = StyleARGenerator(model, adapter_dir, device="cpu", max_batch=len(pairs))
    seeds = [seed * 100_000 + i for i in range(len(pairs))]
    out = generator.style([p.content.prompt for p in pairs], [p.reference for p in pairs], seeds, sampling)
    return generator.decode(out.tokens, out.layout)


def evaluate_variant(
    model: ModelConfig,
    adapter_dir: str | Path | None,
    judges: Judges,
    cfg: WorldEvalConfig,
    pairs: Sequence[HeldOutPair] | None = None,
    palette_judge: ColourPaletteJudge | None = None,
) -> tuple[dict[str, Any], list[Image.Image]]:
    """Judge one variant on the held-out pairs: its figures and its images."""
    pairs = list(pairs) if pairs is not None else held_out_pairs(cfg)
    images = generate_variant(model, adapter_dir, pairs, cfg.sampling, cfg.seed)
    return judge_images(judges, images, pairs, palette_judge), images


__all__ = [
    "HeldOutPair",
    "WorldEvalConfig",
    "evaluate_variant",
    "generate_variant",
    "held_out_pairs",
    "judge_images",
]

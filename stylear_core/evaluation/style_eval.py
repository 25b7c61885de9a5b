"""Style evaluation: generate for held (prompt, style reference) pairs with the base and tuned models, score.

For every held pair (your own prompts and style references from parquet, or procedural rows of
:class:`~stylear_core.data.synthetic.SyntheticStyleSet` drawn with a seed the training data does not use) each *variant* (``base``: the untuned model, no LoRA and
the freshly initialised resampler; any number of tuned adapter directories) generates
``samples_per_pair`` images through :class:`~stylear_core.inference.engine.ImageGenerationEngine`
(batched CFG, per-sample seeds, the same seeds for every variant) and the VQGAN decodes them. Each
sample is scored against its reference:

* ``code_style``: :func:`code_similarity`, the histogram intersection of the sample's VQ codes and the
  reference's (the reference encoded by the same VQGAN): the share of "visual words" they have in
  common. This is the style statistic the AR model directly controls, and it is deterministic. On the
  tiny preset it is the one that can move: the random tiny VQGAN's *encoder* gives each synthetic
  style its own codes, but its random *decoder* draws nearly the same picture for any code grid, so
  pixel statistics of decoded samples cannot tell models apart there;
* ``palette``: :func:`palette_similarity`, the histogram intersection of the decoded sample's and the
  reference's joint RGB histograms, in [0, 1] (the synthetic styles differ first of all by palette);
* ``clip_style``: CLIP image cosine of sample and reference (CLIP-I, StyleAR's style score), and
  ``clip_text``: CLIP cosine of sample and prompt (CLIP-T, prompt adherence); random CLIP on tiny;
* ``*_other`` and ``*_margin``: the same statistic against the references of the *other* held styles
  (averaged) and the difference, which says whether a sample took *its* reference's style rather than
  the training data's average look.

Pixel statistics compare with the reference as the image tokenizer reconstructs it
(``reference_view: vq``): a generated image can only be what the VQ decoder draws, and training takes
its style images the same way (``style_source: vq_decode``). ``reference_view: pixels`` compares with
the raw reference. Besides the decoded images, :func:`code_map_image` draws every code grid in false
colour (one fixed colour per code), so the report shows which codes a model writes.

Outputs of :func:`write_style_eval` (``stylear.style_eval/1``)::

    <output_dir>/samples.parquet      one row per generated sample (EVAL_SAMPLES_SCHEMA), paths relative
    <output_dir>/metrics.parquet      one row per variant: mean scores (EVAL_METRICS_SCHEMA)
    <output_dir>/metrics.json         the same, plus per-style means and the tuned-minus-base deltas
    <output_dir>/samples/<variant>/<pair>_<k>.png (+ _codes.png)
    <output_dir>/references/<pair>_input.png, <pair>.png (as compared), <pair>_codes.png
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from stylear_core.config import option
from stylear_core.data.images import decode_image, encode_png
from stylear_core.data.schemas import EVAL_METRICS_SCHEMA, EVAL_SAMPLES_SCHEMA, rows_to_table
from stylear_core.data.schemas import EVAL_SCORE_COLUMNS as SCORE_COLUMNS
from stylear_core.data.synthetic import SyntheticStyleSet
from stylear_core.inference.defaults import SamplingConfig
from stylear_core.models.presets import ModelConfig

STYLE_EVAL_FORMAT = "stylear.style_eval/1"
EVALUATE_FORMAT = "stylear.evaluate/1"  # the evaluate stage's manifest
BASE_VARIANT = "base"
PALETTE_BINS = 8  # per channel: 512 joint bins keep the synthetic palettes apart (4 merge vivid and pastel)


@dataclass
class HeldPairsConfig:
    """The held (prompt, style reference) pairs: your own (``path``), or procedural from a seed the training
    data does not use."""

    count: int = option(
        8, "held (prompt, style reference) pairs (procedural; with path: the first count, 0 all)"
    )
    num_styles: int = option(4, "distinct styles among them (>= 2: the *_other scores need another style)")
    seed: int = option(2, "seed of the procedural set (curation uses 0, preference pairs 1)")
    path: str = option(
        "",
        "parquet file or dir of your own pairs: prompt, style_image (image bytes), optional id and "
        "style_ref (a style name; default: each distinct image is its own style); empty: procedural",
    )


@dataclass
class EvalSamplingConfig(SamplingConfig):
    """How each variant samples (the shared :class:`SamplingConfig` plus samples per pair, the base seed and
    the reference view); every variant uses the same seeds."""

    samples_per_pair: int = option(2, "images per held pair and variant")
    seed: int = option(0, "base seed of the per-sample seeds (see eval_sample_seed)")
    reference_view: Literal["vq", "pixels"] = option(
        "vq", "compare with the reference's VQGAN reconstruction (what the decoder can draw) or its pixels"
    )


def read_held_pairs(path: str | Path, size: int, count: int = 0) -> list[dict[str, Any]]:
    """Your own held pairs from parquet (see :attr:`HeldPairsConfig.path`) as ``{id, prompt, style_ref,
    style_image}``, each reference centre-cropped to ``size`` and re-encoded as PNG.

    Ids become safe, unique file stems (other characters -> ``_``; a clash or none -> ``pair-<n>``).
    Raises ``ValueError`` naming the row for a missing column, an empty prompt or an unreadable image,
    and when fewer than two styles are present (the ``*_other`` scores compare with another style).
    """
    import hashlib

    from stylear_core.data.images import ImageDecodeError, center_crop_resize

    table = pq.read_table(str(path))
    missing = [c for c in ("prompt", "style_image") if c not in table.column_names]
    if missing:
        raise ValueError(f"held pairs {path}: missing column(s) {missing} (have {table.column_names})")
    rows = table.to_pylist()[: count or None]
    pairs: list[dict[str, Any]] = []
    seen: set[str] = set()
    for n, row in enumerate(rows):
        # The id names the output files: keep it to a safe, unique file stem.
        row_id = re.sub(r"[^A-Za-z0-9_-]+", "_", str(row.get("id") or ""))[:64]
        if not row_id.strip("_") or row_id in seen:
            row_id = f"pair-{n:05d}"
        seen.add(row_id)
        prompt = str(row.get("prompt") or "").strip()
        if not prompt:
            raise ValueError(f"held pairs {path}: row {row_id!r} has an empty prompt")
        data = row.get("style_image")
        try:
            image = decode_image(bytes(data or b""), max_pixels=64_000_000)
        except ImageDecodeError as e:
            raise ValueError(f"held pairs {path}: row {row_id!r}: style_image: {e}") from None
        style = row.get("style_ref") or "image-" + hashlib.blake2b(bytes(data), digest_size=6).hexdigest()
        png = encode_png(center_crop_resize(image, size, size))
        pairs.append({"id": row_id, "prompt": prompt, "style_ref": str(style), "style_image": png})
    styles = {p["style_ref"] for p in pairs}
    if len(styles) < 2:
        raise ValueError(
            f"held pairs {path}: {len(pairs)} row(s) of {len(styles)} style(s); at least 2 styles are "
            "needed (the *_other scores compare each sample with the other styles' references)"
        )
    return pairs


def held_pairs(cfg: HeldPairsConfig, size: int) -> list[dict[str, Any]]:
    """The held pairs ``{id, prompt, style_ref, style_image}`` (PNG bytes of side ``size``): those in
    ``cfg.path`` (:func:`read_held_pairs`), else procedural ones, taking the styles in turn so that
    every one of the ``num_styles`` styles is among the first few pairs."""
    if cfg.path:
        return read_held_pairs(cfg.path, size, cfg.count)
    if cfg.num_styles < 2:
        raise ValueError(
            f"num_styles must be >= 2 (the *_other scores need another style), got {cfg.num_styles}"
        )
    rows = SyntheticStyleSet(seed=cfg.seed, size=size).stylization_requests(8 * cfg.count, cfg.num_styles)
    by_style: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_style.setdefault(row["style_ref"], []).append(row)
    queues = list(by_style.values())
    picked: list[dict[str, Any]] = []
    while len(picked) < cfg.count and any(queues):
        for queue in queues:
            if queue and len(picked) < cfg.count:
                picked.append(queue.pop(0))
    return [{k: r[k] for k in ("id", "prompt", "style_ref", "style_image")} for r in picked]


# ---------------------------------------------------------------------------------------------
# Deterministic style statistics


def colour_histogram(image: Image.Image, bins: int = PALETTE_BINS) -> np.ndarray:
    """The joint RGB histogram of ``image`` with ``bins`` per channel, normalised to sum 1: ``(bins**3,)``."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.int64).reshape(-1, 3)
    index = pixels * bins // 256
    flat = (index[:, 0] * bins + index[:, 1]) * bins + index[:, 2]
    counts = np.bincount(flat, minlength=bins**3).astype(np.float64)
    return counts / max(counts.sum(), 1.0)


def palette_similarity(a: Image.Image, b: Image.Image, bins: int = PALETTE_BINS) -> float:
    """Histogram intersection of the two images' joint RGB histograms: 1 = same colours, 0 = disjoint."""
    return float(np.minimum(colour_histogram(a, bins), colour_histogram(b, bins)).sum())


def code_histogram(codes: np.ndarray | torch.Tensor, codebook_size: int) -> np.ndarray:
    """How often each VQ code occurs in ``codes`` (any shape), normalised to sum 1: ``(codebook_size,)``."""
    flat = np.asarray(codes).reshape(-1).astype(np.int64)
    counts = np.bincount(flat, minlength=codebook_size).astype(np.float64)
    return counts / max(counts.sum(), 1.0)


def code_map_image(codes: np.ndarray | torch.Tensor, codebook_size: int, cell: int = 16) -> Image.Image:
    """A VQ code grid ``(h, w)`` in false colour: one fixed colour per code (hues a golden-ratio step apart,
    brightness cycling), each latent cell ``cell`` pixels wide, so equal codes look equal across images."""
    import colorsys

    grid = np.asarray(codes).astype(np.int64)
    table = np.array(
        [
            colorsys.hsv_to_rgb((c * 0.6180339887) % 1.0, 0.75, 0.55 + 0.15 * (c % 3))
            for c in range(codebook_size)
        ]
    )
    rgb = (table[grid] * 255).round().astype(np.uint8)
    return Image.fromarray(rgb, "RGB").resize((grid.shape[1] * cell, grid.shape[0] * cell), Image.NEAREST)


def code_similarity(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, codebook_size: int) -> float:
    """Histogram intersection of two VQ code grids' code histograms: the share of visual words they have in
    common, 1 = the same codes in the same amounts, 0 = no code in common."""
    return float(np.minimum(code_histogram(a, codebook_size), code_histogram(b, codebook_size)).sum())


# ---------------------------------------------------------------------------------------------
# Generation and scoring of one variant


def eval_sample_seed(base: int, pair_index: int, sample: int) -> int:
    """The seed of sample ``sample`` of held pair ``pair_index``: the same for every variant."""
    return (base * 1_000_003 + pair_index * 1_009 + sample) % 2**62


def vq_reconstruction(vq: Any, images: Sequence[Image.Image]) -> list[Image.Image]:
    """``images`` encoded to VQ codes and decoded again (what the image tokenizer can express)."""
    from stylear_core.models.vqgan import decode_to_images, encode_images

    height, width = images[0].height, images[0].width
    return decode_to_images(vq, encode_images(vq, list(images), (height, width)))


@dataclass
class StyleSample:
    """One generated sample to score: its image and VQ codes ``(h, w)``, its reference (image as compared and
    the reference's own VQ codes), its prompt and the reference's style id."""

    image: Image.Image
    codes: np.ndarray
    reference: Image.Image
    reference_codes: np.ndarray
    prompt: str
    style_ref: str


def score_samples(samples: Sequence[StyleSample], scorer: Any, codebook_size: int) -> dict[str, np.ndarray]:
    """Every score of :data:`SCORE_COLUMNS`, one value per sample: against the sample's own reference and
    prompt, and (``*_other``) averaged over the references of the other styles among ``samples``.

    ``scorer`` is a :class:`~stylear_core.models.clip.ClipScorer` (``image_similarity``, ``text_score``).
    """
    by_style: dict[str, StyleSample] = {}
    for sample in samples:
        by_style.setdefault(sample.style_ref, sample)
    if len(by_style) < 2:
        raise ValueError("scoring needs references of at least two styles")
    scores: dict[str, list[float]] = {
        name: [] for name in ("code_style", "code_style_other", "palette", "palette_other")
    }
    for sample in samples:
        others = [o for style, o in by_style.items() if style != sample.style_ref]
        scores["code_style"].append(code_similarity(sample.codes, sample.reference_codes, codebook_size))
        scores["code_style_other"].append(
            float(np.mean([code_similarity(sample.codes, o.reference_codes, codebook_size) for o in others]))
        )
        scores["palette"].append(palette_similarity(sample.image, sample.reference))
        scores["palette_other"].append(
            float(np.mean([palette_similarity(sample.image, o.reference) for o in others]))
        )
    out = {k: np.asarray(v, dtype=np.float32) for k, v in scores.items()}
    out["code_margin"] = out["code_style"] - out["code_style_other"]
    out["palette_margin"] = out["palette"] - out["palette_other"]
    images = [s.image for s in samples]
    out["clip_style"] = (
        scorer.image_similarity(images, [s.reference for s in samples]).numpy().astype(np.float32)
    )
    out["clip_text"] = scorer.text_score(images, [s.prompt for s in samples]).numpy().astype(np.float32)
    return out


def evaluate_variant(
    variant: str,
    adapter_dir: str | None,
    model: ModelConfig,
    pairs: Sequence[Mapping[str, Any]],
    sampling: EvalSamplingConfig,
    device: str = "auto",
) -> list[dict[str, Any]]:
    """Generate and score every held pair with one variant (``adapter_dir`` None: the base model).

    Returns one row per sample: the :data:`EVAL_SAMPLES_SCHEMA` fields except the paths, plus ``png``
    (the decoded sample), ``codes_png`` (its code map), ``reference_png`` (the reference as compared, see
    ``reference_view``), ``reference_codes_png`` (the reference's code map) and ``style_png`` (the
    reference as given).
    """
    from stylear_core.inference.generator import StyleARGenerator
    from stylear_core.models.presets import build_clip_scorer
    from stylear_core.models.vqgan import encode_images

    generator = StyleARGenerator(model, adapter_dir, device)
    size = model.image_size
    k = sampling.samples_per_pair
    raw_refs = [decode_image(p["style_image"]) for p in pairs]
    refs = vq_reconstruction(generator.vq, raw_refs) if sampling.reference_view == "vq" else raw_refs
    expanded = [(i, s) for i in range(len(pairs)) for s in range(k)]
    seeds = [eval_sample_seed(sampling.seed, i, s) for i, s in expanded]
    generated = generator.style(
        [str(pairs[i]["prompt"]) for i, _ in expanded], [raw_refs[i] for i, _ in expanded], seeds, sampling
    )
    images = generator.decode(generated.tokens, generated.layout)
    codes = generated.codes().numpy()
    ref_codes = encode_images(generator.vq, raw_refs, (size, size)).cpu().numpy()
    codebook_size = generator.vocab.codebook_size
    samples = [
        StyleSample(
            images[j], codes[j], refs[i], ref_codes[i], str(pairs[i]["prompt"]), str(pairs[i]["style_ref"])
        )
        for j, (i, _) in enumerate(expanded)
    ]
    scores = score_samples(samples, build_clip_scorer(model, generator.device), codebook_size)
    rows = []
    for j, (i, s) in enumerate(expanded):
        rows.append(
            {
                "variant": variant,
                "pair_id": str(pairs[i]["id"]),
                "prompt": str(pairs[i]["prompt"]),
                "style_ref": str(pairs[i]["style_ref"]),
                "sample": s,
                "seed": seeds[j],
                "png": encode_png(images[j]),
                "codes_png": encode_png(code_map_image(codes[j], codebook_size)),
                "reference_png": encode_png(refs[i]),
                "reference_codes_png": encode_png(code_map_image(ref_codes[i], codebook_size)),
                "style_png": bytes(pairs[i]["style_image"]),
                **{name: float(scores[name][j]) for name in SCORE_COLUMNS},
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# Summaries and outputs


def summarize(
    rows: Sequence[Mapping[str, Any]],
    adapters: Mapping[str, str | None],
    tuned: str | None = None,
    headline: str = "code_style",
) -> dict[str, Any]:
    """Per-variant means, per-(variant, style) means and ``tuned - base`` deltas of the sample rows.

    ``adapters`` maps variant -> adapter dir (None for the base); ``tuned`` names the variant the
    headline compares with the base (default: the last tuned variant); ``style_improved`` says whether
    its ``headline`` score is above the base's.
    """
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    per_variant: dict[str, dict[str, float]] = {}
    per_style: dict[str, dict[str, dict[str, float]]] = {}
    for v in variants:
        mine = [r for r in rows if r["variant"] == v]
        per_variant[v] = {name: float(np.mean([r[name] for r in mine])) for name in SCORE_COLUMNS}
        per_variant[v]["samples"] = len(mine)
        per_style[v] = {}
        for style in sorted({r["style_ref"] for r in mine}):
            these = [r for r in mine if r["style_ref"] == style]
            per_style[v][style] = {name: float(np.mean([r[name] for r in these])) for name in SCORE_COLUMNS}
    tuned_variants = [v for v in variants if v != BASE_VARIANT]
    tuned = tuned or (tuned_variants[-1] if tuned_variants else None)
    deltas = {}
    if tuned is not None and BASE_VARIANT in per_variant and tuned in per_variant:
        deltas = {name: per_variant[tuned][name] - per_variant[BASE_VARIANT][name] for name in SCORE_COLUMNS}
    return {
        "format": STYLE_EVAL_FORMAT,
        "variants": variants,
        "adapters": {v: adapters.get(v) for v in variants},
        "tuned": tuned,
        "metrics": per_variant,
        "per_style": per_style,
        "delta_tuned_minus_base": deltas,
        "headline": headline,
        "style_improved": bool(deltas) and deltas[headline] > 0,
    }


def write_style_eval(
    output_dir: str | Path, rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]
) -> dict[str, Path]:
    """Write the sample images, references, ``samples.parquet``, ``metrics.parquet`` and ``metrics.json``
    (see the module docstring) under ``output_dir``; returns their paths by name."""
    out = Path(output_dir)
    table_rows = []
    for r in rows:
        stem = Path("samples") / r["variant"] / f"{r['pair_id']}_{r['sample']}"
        files = {
            stem.with_suffix(".png"): r["png"],
            stem.parent / f"{stem.name}_codes.png": r["codes_png"],
            Path("references") / f"{r['pair_id']}.png": r["reference_png"],
            Path("references") / f"{r['pair_id']}_codes.png": r["reference_codes_png"],
            Path("references") / f"{r['pair_id']}_input.png": r["style_png"],
        }
        for rel, data in files.items():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(data)
        keep = {k: v for k, v in r.items() if not k.endswith("png")}
        table_rows.append(
            {**keep, "image_path": str(stem.with_suffix(".png")), "codes_path": f"{stem}_codes.png"}
        )
    paths = {
        "samples": out / "samples.parquet",
        "metrics": out / "metrics.parquet",
        "json": out / "metrics.json",
    }
    pq.write_table(rows_to_table(table_rows, EVAL_SAMPLES_SCHEMA), paths["samples"])
    metric_rows = [
        {
            "variant": v,
            "adapter": summary["adapters"].get(v),
            "samples": int(summary["metrics"][v]["samples"]),
            **{name: summary["metrics"][v][name] for name in SCORE_COLUMNS},
        }
        for v in summary["variants"]
    ]
    pq.write_table(rows_to_table(metric_rows, EVAL_METRICS_SCHEMA), paths["metrics"])
    paths["json"].write_text(json.dumps(summary, indent=2, sort_keys=True))
    return paths


__all__ = [
    "BASE_VARIANT",
    "STYLE_EVAL_FORMAT",
    "EVAL_METRICS_SCHEMA",
    "EVAL_SAMPLES_SCHEMA",
    "EVALUATE_FORMAT",
    "EvalSamplingConfig",
    "HeldPairsConfig",
    "SCORE_COLUMNS",
    "colour_histogram",
    "evaluate_variant",
    "held_pairs",
    "read_held_pairs",
    "palette_similarity",
    "eval_sample_seed",
    "StyleSample",
    "code_histogram",
    "code_map_image",
    "code_similarity",
    "score_samples",
    "summarize",
    "vq_reconstruction",
    "write_style_eval",
]

"""The miniature world's part of the run report (:mod:`stylear_core.evaluation.run_report`).

For a run with an ``evaluate_world`` stage (:mod:`stylear_core.miniature.evaluate_stage`),
:func:`world_sections` renders, from what the run holds:

* the world's trained parts and their figures (the pretrain stage's summary and ``world.json``): VQGAN
  reconstruction PSNR, the judges' accuracy on held-out drawn images and on their VQ round trips, the
  style encoders' retrieval, the pretrained base's content accuracy;
* the accuracy table of ``evaluate_world/metrics.json``: style and its parts, the colour-only palette
  judge, content and leakage, per variant, with chance;
* the noise ablation: the tuned variant with the style-token noise at inference set to each ablated
  strength against the default;
* for each held-out style, one row: the reference | each variant's sample (cut from the stage's
  ``grid.png``, whose rows are the references, then each variant in metrics.json order, and whose
  columns are the held-out pairs in order) | the images the demo got back over HTTP for the same pair
  (``served/responses.json``: request ``i`` is pair ``i``), with the SFT adapter and with the base;
* VQGAN reconstructions: a few drawn images in held-out styles next to their round trip through the
  world's VQGAN (computed here, from ``<run_dir>/pretrain/model``).

Every figure is written under ``<run_dir>/report/world/`` and linked relatively.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from stylear_core.data.synthetic import PALETTES, STROKES, TEXTURES
from stylear_core.evaluation.report_html import esc as _esc
from stylear_core.evaluation.report_html import img as _img
from stylear_core.evaluation.report_html import table as _table
from stylear_core.runs import published_model_dir, read_manifest

WORLD_STAGE_FORMAT = "stylear.evaluate_world/1"  # EVALUATE_WORLD_FORMAT, without importing the stage
WORLD_ASSETS = "report/world"
# metrics.json key -> column label, and each one's chance (None: no single chance figure).
ACCURACY_COLUMNS: dict[str, tuple[str, float | None]] = {
    "style_accuracy": ("style (palette+texture+stroke)", None),  # chance from the file: 1 / all styles
    "palette_accuracy": ("palette (style judge)", 1 / len(PALETTES)),
    "palette_colour_accuracy": ("palette (colour judge)", 1 / len(PALETTES)),
    "texture_accuracy": ("texture", 1 / len(TEXTURES)),
    "stroke_accuracy": ("stroke", 1 / len(STROKES)),
    "content_accuracy": ("content (kind at place)", None),
    "leakage": ("leakage (reference's object) ↓", None),
}
REFERENCE_ROW = "reference"
RECONSTRUCTIONS = 6


def is_world_stage(manifest: Mapping[str, Any]) -> bool:
    """Whether a stage manifest is the miniature world's evaluation."""
    return manifest.get("format") == WORLD_STAGE_FORMAT


def grid_tiles(grid_png: Path, rows: list[str], out_dir: Path) -> dict[str, list[Path]]:
    """Cut ``grid_png`` (square tiles; one row per name in ``rows``) into one PNG per tile under ``out_dir``:
    ``{row name: [tile path per column]}``."""
    grid = Image.open(grid_png).convert("RGB")
    side = grid.height // len(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    tiles: dict[str, list[Path]] = {}
    for y, name in enumerate(rows):
        safe = name.replace("@", "_").replace("=", "")
        tiles[name] = []
        for x in range(grid.width // side):
            path = out_dir / f"{safe}_{x}.png"
            grid.crop((x * side, y * side, (x + 1) * side, (y + 1) * side)).save(path)
            tiles[name].append(path)
    return tiles


def vqgan_reconstructions(
    world_dir: Path, out_dir: Path, count: int = RECONSTRUCTIONS
) -> list[dict[str, Any]]:
    """``count`` drawn images in held-out styles and their round trip through the world's VQGAN, as PNGs under
    ``out_dir``; per image its style, both paths and the round trip's PSNR (dB)."""
    import torch

    from stylear_core.data.images import to_pil, to_tensor
    from stylear_core.data.synthetic import render
    from stylear_core.miniature.data import HELD_OUT_STYLES, WORLD_IMAGE_SIZE, scenes
    from stylear_core.miniature.judges import vq_round_trip
    from stylear_core.miniature.vqgan_training import psnr
    from stylear_core.miniature.world import WorldPaths, load_vqgan

    vq = load_vqgan(WorldPaths(world_dir))
    # A stream no stage draws from, in styles no stage trains on.
    items = scenes(0, count, HELD_OUT_STYLES, "report-reconstructions")
    pixels = to_tensor([render(content, style, WORLD_IMAGE_SIZE) for content, style in items])
    with torch.no_grad():
        recon = vq_round_trip(vq, pixels).clamp(-1, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    shown = []
    for i, (drawn, decoded, (content, style)) in enumerate(zip(to_pil(pixels), to_pil(recon), items)):
        drawn_path, recon_path = out_dir / f"vq_{i}_drawn.png", out_dir / f"vq_{i}_recon.png"
        drawn.save(drawn_path)
        decoded.save(recon_path)
        shown.append(
            {
                "prompt": content.prompt,
                "style": style.style_id,
                "drawn": drawn_path,
                "reconstruction": recon_path,
                "psnr_db": psnr(pixels[i : i + 1], recon[i : i + 1]),
            }
        )
    return shown


def _world_judges(run_dir: Path) -> dict[str, Any]:
    """The judges' held-out figures of the run's world (``world.json``), if it has them."""
    world_json = published_model_dir(run_dir / "pretrain") / "world.json"
    return (json.loads(world_json.read_text()).get("judges") or {}) if world_json.is_file() else {}


def _world_figures_section(run_dir: Path) -> str:
    summary = (read_manifest(run_dir / "pretrain") or {}).get("summary") or {}
    world_json = published_model_dir(run_dir / "pretrain") / "world.json"
    world = json.loads(world_json.read_text()) if world_json.is_file() else {}
    if not summary and not world:
        return ""
    rows: list[list[Any]] = []
    vq = world.get("vqgan") or {}
    if "psnr_db" in vq or "vqgan_psnr_db" in summary:
        psnr = vq.get("psnr_db", summary.get("vqgan_psnr_db"))
        rows.append(["VQGAN reconstruction PSNR (dB), held-out drawn images", psnr, "≥ 24 wanted"])
    if vq.get("codebook_size"):
        rows.append(
            ["VQGAN codes used on held-out images", f"{vq['codes_used_held']} / {vq['codebook_size']}", ""]
        )
    judges = world.get("judges") or summary.get("judges") or {}
    chance = judges.get("chance_style")
    for where, label in (("raw", "drawn"), ("vq_reconstruction", "VQ round trip")):
        for key, value in (judges.get(where) or {}).items():
            if isinstance(value, (int, float)):
                note = f"chance {chance:.3f}" if key == "style" and chance else ""
                rows.append([f"judge accuracy: {key}, on held-out {label} images", float(value), note])
    for encoder, figures in (world.get("style_encoder") or {}).items():
        if isinstance(figures, Mapping) and "retrieval_style" in figures:
            rows.append(
                [
                    f"style retrieval, {encoder.replace('_', ' ')} (nearest neighbour, held-out styles)",
                    float(figures["retrieval_style"]),
                    f"chance {figures.get('chance_style', 0):.3f}",
                ]
            )
    if "base_content_accuracy" in summary:
        rows.append(
            ["pretrained base: content accuracy, text prompts only", summary["base_content_accuracy"], ""]
        )
    return (
        "<h2>The miniature world's trained parts</h2><p class='note'>Trained by the pretrain stage on "
        "procedural images (cached under the run's .cache and reused on a rerun); measured on held-out "
        "images whose content and style are known.</p>" + _table(["figure", "value", "note"], rows, digits=3)
    )


def _accuracy_section(metrics: Mapping[str, Mapping[str, Any]], judges: Mapping[str, Any]) -> str:
    first = next(iter(metrics.values()))
    keys = [k for k in ACCURACY_COLUMNS if any(k in m for m in metrics.values())]
    rows = [[name, m.get("pairs", "")] + [m.get(k, "") for k in keys] for name, m in metrics.items()]
    chance = [ACCURACY_COLUMNS[k][1] for k in keys]
    if "style_accuracy" in keys:
        chance[keys.index("style_accuracy")] = first.get("chance_style")
    rows.append(["chance", ""] + [c if c is not None else "—" for c in chance])
    return (
        "<h2>Held-out styles: accuracy per variant</h2><p class='note'>Each variant draws one image per "
        "held-out pair (a prompt, and a reference in a style never trained on, showing another object "
        "elsewhere). The judges, trained only on drawn images, read it: style is right when palette, "
        "texture and stroke all are; the colour judge names the palette from colours alone; content is "
        "the prompt's object kind at the prompt's place; leakage is the reference's object appearing "
        "(lower is better).</p>"
        + _table(["variant", "pairs", *[ACCURACY_COLUMNS[k][0] for k in keys]], rows, digits=3)
        + _verdict(metrics, judges)
    )


def _verdict(metrics: Mapping[str, Mapping[str, Any]], judges: Mapping[str, Any]) -> str:
    """One sentence per tuned variant on the palette (the colour judge when present: it needs no
    training), and a caution when the trained judges read held-out drawn images poorly."""
    key = "palette_colour_accuracy" if all("palette_colour_accuracy" in m for m in metrics.values()) else None
    key = key or "palette_accuracy"
    base = metrics.get("base", {}).get(key)
    parts = []
    for name, m in metrics.items():
        if name == "base" or "@" in name or base is None or key not in m:
            continue
        chance = 1 / len(PALETTES)
        above = "above" if m[key] > max(base, chance) else "NOT above"
        parts.append(
            f"<p class='verdict'><b>{_esc(name)}</b> draws the held-out reference's palette in "
            f"{m[key]:.0%} of pairs, against {base:.0%} for the base with the same references and "
            f"{chance:.0%} by chance: <b>{above}</b> both ({_esc(ACCURACY_COLUMNS[key][0])}).</p>"
        )
    raw = judges.get("raw") or {}
    weak = {k: v for k, v in raw.items() if isinstance(v, (int, float)) and v < 0.9}
    if weak:
        shown = ", ".join(f"{k} {v:.2f}" for k, v in weak.items())
        parts.append(
            f"<p class='note'>The trained judges read held-out drawn images at {_esc(shown)} (below 0.9): "
            "their columns are rough here; the colour judge needs no training.</p>"
        )
    return "".join(parts)


def _ablation_section(metrics: Mapping[str, Mapping[str, Any]], default_noise: float | None) -> str:
    ablated = [name for name in metrics if "@noise=" in name]
    if not ablated:
        return ""
    tuned = ablated[0].split("@", 1)[0]
    rows = []
    if tuned in metrics:
        m = metrics[tuned]
        shown = "default" if default_noise is None else f"{default_noise:g} (default)"
        rows.append([tuned, shown, m.get("style_accuracy"), m.get("content_accuracy"), m.get("leakage")])
    for name in ablated:
        m = metrics[name]
        rows.append(
            [
                tuned,
                name.split("@noise=", 1)[1],
                m.get("style_accuracy"),
                m.get("content_accuracy"),
                m.get("leakage"),
            ]
        )
    return (
        "<h2>Ablation: style-token noise at inference</h2><p class='note'>Noise on the style tokens is "
        "StyleAR's guard against copying the reference's content: with it, leakage should be lower.</p>"
        + _table(["variant", "noise strength", "style", "content", "leakage ↓"], rows, digits=3)
    )


def _exported_variant(run_dir: Path) -> str:
    """Which tuned adapter the export stage published (``DPO``, ``SFT``), from its manifest's config."""
    manifest = run_dir / "export" / "manifest.json"
    if manifest.is_file():
        source = str(json.loads(manifest.read_text()).get("config", {}).get("adapter", ""))
        for stage, name in (("train_dpo", "DPO"), ("train_style", "SFT")):
            if stage in source:
                return name
    return "exported"


def _served_by_pair(run_dir: Path) -> dict[int, dict[str, str]]:
    """``{pair index: {"sft" | "base": served PNG path relative to run_dir}}`` from served/responses.json."""
    responses = run_dir / "served" / "responses.json"
    if not responses.is_file():
        return {}
    found: dict[int, dict[str, str]] = {}
    for r in json.loads(responses.read_text()).get("requests", []):
        image = r.get("image")
        if not image or not (run_dir / "served" / image).is_file():
            continue
        index = str(r.get("reference", "")).split("_", 1)[0]  # "<pair index>_reference.png"
        if index.isdigit():
            found.setdefault(int(index), {})["sft" if r.get("adapter") else "base"] = f"served/{image}"
    return found


def _rows_section(
    run_dir: Path, stage_dir: Path, metrics: Mapping[str, Any], pair_labels: list[tuple[str, str]]
) -> str:
    grid = stage_dir / "grid.png"
    if not grid.is_file():
        return ""
    variants = list(metrics)
    tiles = grid_tiles(grid, [REFERENCE_ROW, *variants], run_dir / WORLD_ASSETS / "grid")
    served = _served_by_pair(run_dir)
    shown = min(len(tiles[REFERENCE_ROW]), len(pair_labels) or len(tiles[REFERENCE_ROW]))
    header = ["pair", "reference", *variants, f"served over HTTP: {_exported_variant(run_dir)} adapter"]
    header.append("served: base")
    parts = [
        "<h2>Held-out styles: reference | each variant | served</h2><p class='note'>One row per held-out "
        "style. The reference shows another object elsewhere: a tuned model should draw the prompt's "
        "object in the reference's style (colours, background texture, stroke), not the reference's "
        "object. The served columns are what the Ray Serve app answered over HTTP for the same prompt "
        "and reference (their own seeds).</p><table class='grid'><tr>"
        + "".join(f"<th>{_esc(h)}</th>" for h in header)
        + "</tr>"
    ]
    for i in range(shown):
        prompt, style = pair_labels[i] if i < len(pair_labels) else ("", "")
        cells = [f"<td class='prompt'>{_esc(prompt)}<br><i>{_esc(style)}</i></td>"]
        for name in [REFERENCE_ROW, *variants]:
            cells.append(f"<td>{_img(str(tiles[name][i].relative_to(run_dir)), name)}</td>")
        for kind in ("sft", "base"):
            src = served.get(i, {}).get(kind)
            cells.append(f"<td>{_img(src, kind) if src else '—'}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</table>")
    return "".join(parts)


def _reconstructions_section(run_dir: Path) -> str:
    world_dir = published_model_dir(run_dir / "pretrain")
    if not (world_dir / "vqgan.safetensors").is_file():
        return ""
    shown = vqgan_reconstructions(world_dir, run_dir / WORLD_ASSETS / "vqgan")
    cells = "".join(
        "<div class='pair'>"
        + _img(str(s["drawn"].relative_to(run_dir)), "drawn")
        + _img(str(s["reconstruction"].relative_to(run_dir)), f"VQ round trip {s['psnr_db']:.1f} dB")
        + f"<p class='note'>{_esc(s['prompt'])}<br>{_esc(s['style'])}</p></div>"
        for s in shown
    )
    return (
        "<h2>VQGAN reconstructions</h2><p class='note'>Drawn images in held-out styles and the world's "
        "VQGAN round trip of each (encode to 8×8 codes, decode): what every generated image is made of.</p>"
        + cells
    )


def pair_labels(stage_manifest: Mapping[str, Any], count: int) -> list[tuple[str, str]]:
    """(prompt, style id) of the first ``count`` held-out pairs of an evaluate_world stage (its config)."""
    from stylear_core.config import from_dict
    from stylear_core.miniature.evaluate import WorldEvalConfig, held_out_pairs

    cfg = from_dict(WorldEvalConfig, (stage_manifest.get("config") or {}).get("eval", {}))
    return [(p.content.prompt, p.style.style_id) for p in held_out_pairs(cfg)[:count]]


def world_sections(run_dir: str | Path, name: str, manifest: Mapping[str, Any]) -> str:
    """The world's report sections for the evaluate_world stage ``name`` of ``run_dir`` (HTML)."""
    from stylear_core.miniature.data import HELD_OUT_STYLES

    run_dir = Path(run_dir)
    stage_dir = run_dir / name
    metrics_file = stage_dir / "metrics.json"
    parts = [_world_figures_section(run_dir)]
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        sampling = ((manifest.get("config") or {}).get("eval") or {}).get("sampling") or {}
        parts.append(_accuracy_section(metrics, _world_judges(run_dir)))
        parts.append(_ablation_section(metrics, sampling.get("noise_strength")))
        parts.append(_rows_section(run_dir, stage_dir, metrics, pair_labels(manifest, len(HELD_OUT_STYLES))))
    parts.append(_reconstructions_section(run_dir))
    return "".join(p for p in parts if p)


__all__ = [
    "WORLD_ASSETS",
    "WORLD_STAGE_FORMAT",
    "grid_tiles",
    "is_world_stage",
    "pair_labels",
    "vqgan_reconstructions",
    "world_sections",
]

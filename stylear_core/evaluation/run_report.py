"""The run report: ``<run_dir>/report.html`` with its figures in ``<run_dir>/report/``.

:func:`write_report` reads what a pipeline run left in its run directory -- whatever of it exists --
and renders one self-contained page (relative links only, so the directory can be copied or served
as is):

* the stages and their summaries (``<run_dir>/manifest.json`` and each ``<stage>/manifest.json``);
* the style evaluation (the stage whose manifest has format :data:`EVALUATE_FORMAT`): the metric table
  per variant, the tuned-minus-base deltas, and per held pair the reference next to the base and tuned
  samples;
* loss curves: one matplotlib PNG per stage that wrote ``metrics.jsonl`` (loss, and for DPO the reward
  margin and accuracy);
* images served over HTTP by the demo (``<run_dir>/served/responses.json``, :data:`SERVED_FORMAT`);
* for a miniature-world run (an ``evaluate_world`` stage), the world's figures, accuracy and ablation
  tables, reference | base | SFT | served rows and VQGAN reconstructions
  (:mod:`stylear_core.evaluation.world_report`);
* Proxy-Tuning's arms (a ``proxy_arms`` stage): their tables, gate verdicts and image grids.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stylear_core.evaluation.report_html import esc as _esc
from stylear_core.evaluation.report_html import fmt as _fmt
from stylear_core.evaluation.report_html import img as _img
from stylear_core.evaluation.report_html import table as _table
from stylear_core.evaluation.style_eval import EVALUATE_FORMAT
from stylear_core.evaluation.world_report import is_world_stage, world_sections
from stylear_core.runs import read_manifest

PROXY_ARMS_FORMAT = "stylear.proxy_arms/1"  # the proxy_arms stage's manifest (its section imports torch)

SERVED_FORMAT = "stylear.served/1"
REPORT_NAME = "report.html"
ASSET_DIR = "report"
SERVED_DIR = "served"
CURVE_KEYS = ("loss", "reward_margin", "accuracy")  # plotted when a metrics log has them
METRIC_NOTE = (
    "code style = histogram intersection of the sample's VQ codes with the reference's (shared visual "
    "words); palette = histogram intersection of joint RGB histograms (8 bins per channel), against the "
    "reference as the VQGAN reconstructs it. Both are deterministic. CLIP scores use the model block's "
    "CLIP. 'vs other styles' is the same statistic against the other held styles' references: own minus "
    "other (the margin) says whether a sample took its own reference's style. On the tiny preset CLIP and "
    "the VQGAN decoder are random, so only the code statistics can move."
)
MARGINS = {"code_style": "code_margin", "palette": "palette_margin"}  # headline -> its own-minus-other score
METRIC_LABELS = {
    "code_style": "code style (VQ codes ∩)",
    "code_style_other": "code vs other styles",
    "code_margin": "code margin (own − other)",
    "clip_style": "CLIP-I to reference",
    "clip_text": "CLIP-T to prompt",
    "palette": "palette (RGB histogram ∩)",
    "palette_other": "palette vs other styles",
    "palette_margin": "palette margin (own − other)",
}


def stage_dirs(run_dir: str | Path) -> dict[str, dict[str, Any]]:
    """``{stage name: its manifest}`` for every subdirectory of ``run_dir`` holding a manifest, in the order
    they were written (the pipeline runs its stages one after another)."""
    found = {}
    for path in sorted(Path(run_dir).iterdir()):
        manifest = read_manifest(path) if path.is_dir() else None
        if manifest is not None:
            found[path.name] = manifest
    return dict(sorted(found.items(), key=lambda item: (str(item[1].get("written_at", "")), item[0])))


def plot_training_curves(metrics_log: str | Path, png: str | Path, title: str) -> Path | None:
    """Plot the :data:`CURVE_KEYS` a ``metrics.jsonl`` holds against ``step`` into ``png`` (one panel
    each); None when the log has no rows."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    from stylear_core.training.metrics import read_metrics_log

    rows = [r for r in read_metrics_log(metrics_log) if "step" in r]
    keys = [k for k in CURVE_KEYS if any(isinstance(r.get(k), (int, float)) for r in rows)]
    if not rows or not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3)
        ax.set_xlabel("optimizer step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        resumed = sorted({r.get("resumed_from") for r in rows if r.get("resumed_from")})
        for step in resumed:  # a restart from a checkpoint: mark where the run resumed
            ax.axvline(step, color="grey", linestyle="--", linewidth=0.8)
    fig.suptitle(title)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


def _stages_section(run_dir: Path, stages: Mapping[str, Mapping[str, Any]]) -> str:
    pipeline = read_manifest(run_dir) or {}
    rows = []
    for name, manifest in stages.items():
        summary = manifest.get("summary") or {}
        short = {
            k: v
            for k, v in summary.items()
            if isinstance(v, (int, float, str, bool)) and not str(v).startswith("/")
        }
        shown = ", ".join(f"{k}={_fmt(v) if isinstance(v, float) else v}" for k, v in list(short.items())[:8])
        rows.append(
            (
                name,
                manifest.get("format", ""),
                manifest.get("status", ""),
                manifest.get("written_at", ""),
                shown,
            )
        )
    status = _esc(pipeline.get("status", "(no pipeline manifest)"))
    return f"<h2>Stages</h2><p>pipeline status: <b>{status}</b></p>" + _table(
        ["stage", "format", "status", "written", "summary"], rows
    )


def _evaluation_section(run_dir: Path, name: str, eval_dir: Path) -> str:
    metrics_file = eval_dir / "metrics.json"
    if not metrics_file.is_file():
        return ""
    summary = json.loads(metrics_file.read_text())
    variants = summary["variants"]
    score_keys = [k for k in METRIC_LABELS if k in summary["metrics"][variants[0]]]
    rows = [
        [v, summary["adapters"].get(v) or "(base model)", summary["metrics"][v]["samples"]]
        + [summary["metrics"][v][k] for k in score_keys]
        for v in variants
    ]
    parts = [f"<h2>Style evaluation ({_esc(name)})</h2>"]
    parts.append(_table(["variant", "adapter", "samples", *[METRIC_LABELS[k] for k in score_keys]], rows))
    deltas = summary.get("delta_tuned_minus_base") or {}
    headline = summary.get("headline", "code_style")
    if deltas:
        verdict = "ABOVE" if summary.get("style_improved") else "NOT above"
        shown = ", ".join(f"{METRIC_LABELS.get(k, k)} {deltas[k]:+.4f}" for k in score_keys if k in deltas)
        parts.append(
            f"<p class='verdict'>After tuning (<b>{_esc(summary['tuned'])}</b>) the style score "
            f"({_esc(METRIC_LABELS.get(headline, headline))}) is <b>{verdict}</b> the untuned base: "
            f"{summary['metrics'][summary['tuned']][headline]:.4f} vs "
            f"{summary['metrics']['base'][headline]:.4f}.</p><p>tuned − base: {_esc(shown)}</p>"
        )
        margin = MARGINS.get(headline)
        if margin in deltas:
            own = "does" if deltas[margin] > 0 else "does not"
            parts.append(
                f"<p class='verdict'>Reference-specific style: the {_esc(METRIC_LABELS[margin])} "
                f"{own} rise over the base ({deltas[margin]:+.4f}), so the tuned model {own} follow "
                "<i>its own</i> reference more than the other held styles.</p>"
            )
    parts.append(f"<p class='note'>{_esc(METRIC_NOTE)}</p>")
    samples = eval_dir / "samples.parquet"
    if samples.is_file():
        import pyarrow.parquet as pq

        table = pq.read_table(samples).to_pylist()
        rel = eval_dir.relative_to(run_dir)
        parts.append(
            "<h3>References and samples, before (base) and after tuning</h3>"
            "<p class='note'>Top: decoded image; bottom: its VQ codes in false colour (one colour per code).</p>"
            "<table class='grid'><tr><th>prompt / style</th><th>reference</th>"
            + "".join(f"<th>{_esc(v)}</th>" for v in variants)
            + "</tr>"
        )
        for pair_id in dict.fromkeys(r["pair_id"] for r in table):
            mine = [r for r in table if r["pair_id"] == pair_id]
            cells = [
                f"<td class='prompt'>{_esc(mine[0]['prompt'])}<br><i>{_esc(mine[0]['style_ref'])}</i></td>"
            ]
            ref = f"{rel}/references/{pair_id}"
            cells.append(
                f"<td>{_img(ref + '_input.png', 'reference')}{_img(ref + '.png', 'as VQ sees it')}"
                f"<br>{_img(ref + '_codes.png', 'codes')}</td>"
            )
            for v in variants:
                these = [r for r in mine if r["variant"] == v]
                top = "".join(_img(f"{rel}/{r['image_path']}", f"seed {r['seed'] % 1000}") for r in these)
                bottom = "".join(
                    _img(f"{rel}/{r['codes_path']}", f"codes {r['code_style']:.3f}") for r in these
                )
                cells.append(f"<td>{top}<br>{bottom}</td>")
            parts.append("<tr>" + "".join(cells) + "</tr>")
        parts.append("</table>")
    return "".join(parts)


def _curves_section(run_dir: Path, stages: Mapping[str, Mapping[str, Any]]) -> str:
    parts = []
    for name in stages:
        log = run_dir / name / "metrics.jsonl"
        if not log.is_file():
            continue
        png = plot_training_curves(log, run_dir / ASSET_DIR / f"curves_{name}.png", f"{name} training")
        if png is not None:
            parts.append(_img(str(png.relative_to(run_dir)), name, width=720))
    return "<h2>Training curves</h2>" + "".join(parts) if parts else ""


def _served_section(run_dir: Path) -> str:
    responses = run_dir / SERVED_DIR / "responses.json"
    if not responses.is_file():
        return ""
    data = json.loads(responses.read_text())
    parts = ["<h2>Served over HTTP (Ray Serve)</h2>"]
    parts.append(
        f"<p>endpoint <code>{_esc(data.get('url', ''))}</code>; adapters {_esc(data.get('adapters', ''))}</p>"
    )
    rows = []
    by_reference: dict[str, list[dict[str, Any]]] = {}
    for r in data.get("requests", []):
        rows.append(
            (
                r.get("endpoint"),
                r.get("adapter") or "(base)",
                r.get("prompt"),
                r.get("status"),
                r.get("seconds"),
                r.get("seed"),
            )
        )
        by_reference.setdefault(r.get("reference") or "", []).append(r)
    figures = []
    for reference, records in by_reference.items():
        cells = [_img(f"{SERVED_DIR}/{reference}", "reference")] if reference else []
        cells += [
            _img(f"{SERVED_DIR}/{r['image']}", r.get("adapter") or "base model")
            for r in records
            if r.get("image")
        ]
        figures.append(
            f"<div class='pair'><p class='note'>{_esc(records[0].get('prompt', ''))}</p>{''.join(cells)}</div>"
        )
    parts.append(_table(["endpoint", "adapter", "prompt", "HTTP status", "seconds", "seed"], rows))
    parts.append("".join(figures))
    if data.get("stats"):
        parts.append(f"<pre>{_esc(json.dumps(data['stats'], indent=1))}</pre>")
    return "".join(parts)


STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 3px 6px; font-size: 13px; vertical-align: top; }
figure { display: inline-block; margin: 2px; text-align: center; font-size: 11px; }
img { image-rendering: pixelated; border: 1px solid #ddd; }
td.prompt { max-width: 220px; }
.verdict { font-size: 15px; }
.note { color: #666; font-size: 12px; }
div.pair { display: inline-block; border: 1px solid #eee; margin: 3px; }
"""


def write_report(run_dir: str | Path, title: str = "StyleAR pipeline run") -> Path:
    """Render ``<run_dir>/report.html`` (figures under ``<run_dir>/report/``) from what the run holds."""
    run_dir = Path(run_dir).resolve()
    stages = stage_dirs(run_dir)
    sections = [_stages_section(run_dir, stages)]
    for name, manifest in stages.items():
        if manifest.get("format") == EVALUATE_FORMAT:
            sections.append(_evaluation_section(run_dir, name, run_dir / name))
        elif is_world_stage(manifest):
            sections.append(world_sections(run_dir, name, manifest))
        elif manifest.get("format") == PROXY_ARMS_FORMAT:
            from stylear_core.miniature.proxy_arms_stage import proxy_arms_section

            sections.append(proxy_arms_section(run_dir, name))
    sections.append(_curves_section(run_dir, stages))
    sections.append(_served_section(run_dir))
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{_esc(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{_esc(title)}</h1><p><code>{_esc(run_dir)}</code></p>"
        + "".join(s for s in sections if s)
        + "</body></html>"
    )
    path = run_dir / REPORT_NAME
    path.write_text(page)
    return path


__all__ = [
    "EVALUATE_FORMAT",
    "REPORT_NAME",
    "SERVED_DIR",
    "SERVED_FORMAT",
    "plot_training_curves",
    "stage_dirs",
    "write_report",
]

"""The run report: sections from whatever the run dir holds, figures next to the HTML, honest verdicts."""

from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image

from stylear_core.data.images import encode_png
from stylear_core.evaluation.run_report import SERVED_FORMAT, plot_training_curves, write_report
from stylear_core.evaluation.style_eval import EVALUATE_FORMAT, SCORE_COLUMNS, summarize, write_style_eval
from stylear_core.runs import write_manifest


def _png(colour: tuple[int, int, int]) -> bytes:
    return encode_png(Image.new("RGB", (16, 16), colour))


def _eval_rows(variant: str, score: float) -> list[dict]:
    return [
        {
            "variant": variant, "pair_id": f"pair{i}", "prompt": f"a <b>red</b> circle {i}",
            "style_ref": f"style{i}", "sample": 0, "seed": 7, "png": _png((200, 0, 0)),
            "codes_png": _png((0, 200, 0)), "reference_png": _png((0, 0, 200)),
            "reference_codes_png": _png((9, 9, 9)), "style_png": _png((1, 2, 3)),
            **{name: score for name in SCORE_COLUMNS},
        }
        for i in range(2)
    ]  # fmt: skip


def _run_dir(
    tmp_path: Path, base_score: float, tuned_score: float, tuned_margin: float | None = None
) -> Path:
    run = tmp_path / "run"
    tuned = _eval_rows("dpo", tuned_score)
    if tuned_margin is not None:
        tuned = [{**r, "code_margin": tuned_margin} for r in tuned]
    rows = _eval_rows("base", base_score) + tuned
    write_style_eval(run / "evaluate", rows, summarize(rows, {"base": None, "dpo": "/x/dpo"}, "dpo"))
    write_manifest(run / "evaluate", EVALUATE_FORMAT, status="complete", summary={"pairs": 2})
    train = run / "train_style"
    train.mkdir(parents=True)
    (train / "metrics.jsonl").write_text(
        "".join(
            json.dumps({"step": s, "loss": 7.0 - 0.3 * s, "resumed_from": 2 if s > 2 else 0}) + "\n"
            for s in range(1, 7)
        )
    )
    write_manifest(train, "stylear.train_style/1", status="complete", summary={"steps": 6, "final_loss": 5.2})
    write_manifest(run, "stylear.pipeline/1", status="complete")
    return run


def _image_sources(html: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', html)


def test_report_links_only_files_that_exist_and_says_tuning_helped(tmp_path):
    run = _run_dir(tmp_path, base_score=0.1, tuned_score=0.3)
    served = run / "served"
    served.mkdir()
    (served / "0_reference.png").write_bytes(_png((5, 5, 5)))
    (served / "0_stylear-tiny.png").write_bytes(_png((6, 6, 6)))
    (served / "responses.json").write_text(
        json.dumps(
            {
                "format": SERVED_FORMAT, "url": "http://127.0.0.1:1", "adapters": ["stylear-tiny"],
                "requests": [
                    {"endpoint": "/v1/generate/style", "adapter": "stylear-tiny", "prompt": "p", "status": 200,
                     "seconds": 0.5, "seed": 1, "reference": "0_reference.png", "image": "0_stylear-tiny.png"},
                    {"endpoint": "/v1/generate/style", "adapter": None, "prompt": "p", "status": 504,
                     "seconds": 60.0, "seed": 1, "reference": "0_reference.png"},
                ],
                "stats": {"batch_sizes": [2]},
            }
        )
    )  # fmt: skip
    path = write_report(run)
    assert path == run / "report.html"
    html = path.read_text()
    sources = _image_sources(html)
    # two pairs x (reference, VQ view, codes, 2 variants x (image, codes)), the loss curve, 2 served images
    assert len(sources) == 2 * 7 + 1 + 2
    assert all((run / s).is_file() for s in sources), [s for s in sources if not (run / s).is_file()]
    assert all(not Path(s).is_absolute() for s in sources)  # the run dir can be moved or served as is
    assert "is <b>ABOVE</b> the untuned base" in html
    assert "&lt;b&gt;red&lt;/b&gt;" in html and "<b>red</b>" not in html  # prompts are escaped
    assert "504" in html and "stylear-tiny" in html


def test_report_says_so_when_tuning_did_not_help(tmp_path):
    html = write_report(_run_dir(tmp_path, base_score=0.3, tuned_score=0.1)).read_text()
    assert "NOT above" in html and "ABOVE" not in html


def test_report_says_whether_the_gain_is_specific_to_each_reference(tmp_path):
    specific = write_report(_run_dir(tmp_path / "a", base_score=0.1, tuned_score=0.3)).read_text()
    assert "code margin (own − other) does rise over the base (+0.2000)" in specific
    # The headline rose, but the margin fell: the tuned model took the styles' common look only.
    common = write_report(_run_dir(tmp_path / "b", 0.1, 0.3, tuned_margin=0.05)).read_text()
    assert "is <b>ABOVE</b> the untuned base" in common
    assert "code margin (own − other) does not rise over the base (-0.0500)" in common


def test_report_of_a_run_with_only_some_stages(tmp_path):
    run = tmp_path / "partial"
    write_manifest(run / "curate", "stylear.curate/1", status="running")
    html = write_report(run).read_text()
    assert "curate" in html and "running" in html
    assert "Style evaluation" not in html and _image_sources(html) == []


def test_loss_curve_plots_every_logged_metric(tmp_path):
    log = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / s, "reward_margin": 0.1 * s, "accuracy": 0.5} for s in range(1, 5)]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    png = plot_training_curves(log, tmp_path / "c.png", "dpo")
    with Image.open(png) as image:
        width, height = image.size
    assert width > 2.5 * height  # three panels side by side: loss, reward margin, accuracy
    log.write_text("")
    assert plot_training_curves(log, tmp_path / "empty.png", "none") is None

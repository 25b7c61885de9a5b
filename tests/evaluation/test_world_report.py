"""The miniature world's report: every section from a world run's files, each image it names on disk,
the grid cut into the right variant's tiles, and the demo's served requests on the same held-out pairs.

The run dir is built from small real artefacts (a random ``mini`` VQGAN, a grid written by the
evaluate_world stage's own writer, served PNGs), so no training runs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image
from safetensors.torch import save_file

from cluster.demo import served_requests
from stylear_core.data.images import encode_png
from stylear_core.evaluation.run_report import SERVED_FORMAT, write_report
from stylear_core.miniature.data import HELD_OUT_STYLES
from stylear_core.miniature.evaluate import WorldEvalConfig, held_out_pairs
from stylear_core.miniature.evaluate_stage import EVALUATE_WORLD_FORMAT, write_grid
from stylear_core.models.vqgan import mini_vqgan_config, random_vqgan
from stylear_core.models.vqgan_checkpoint import vqgan_config_to_yaml
from stylear_core.runs import write_manifest

VARIANTS = ("base", "sft", "sft@noise=0")
# One flat colour per grid row (references, then each variant), so a cut tile says which row it came from.
ROW_COLOURS = [(250, 250, 250), (200, 30, 30), (30, 200, 30), (30, 30, 200)]
EVAL = {"prompts_per_style": 1, "seed": 11, "sampling": {"noise_strength": 0.2}}


def _figures(style: float, leakage: float, palette_colour: float) -> dict:
    return {
        "style_accuracy": style, "palette_accuracy": 0.9, "texture_accuracy": 0.8, "stroke_accuracy": 0.7,
        "content_accuracy": 0.6, "leakage": leakage, "pairs": len(HELD_OUT_STYLES),
        "chance_style": 1 / 90, "palette_colour_accuracy": palette_colour,
    }  # fmt: skip


def _world_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    model = run / "pretrain" / "model"
    model.mkdir(parents=True)
    vq = random_vqgan(mini_vqgan_config(), seed=0)
    save_file({k: v.contiguous() for k, v in vq.state_dict().items()}, str(model / "vqgan.safetensors"))
    (model / "vqgan.yaml").write_text(vqgan_config_to_yaml(vq.config))
    (model / "world.json").write_text(
        json.dumps(
            {
                "vqgan": {"psnr_db": 25.5, "codes_used_held": 100, "codebook_size": 256, "latent_side": 8},
                "judges": {"raw": {"style": 0.97, "content": 0.98}, "chance_style": 1 / 90},
                "style_encoder": {"trained_tiny_clip": {"retrieval_style": 0.83, "chance_style": 1 / 12}},
            }
        )
    )
    write_manifest(
        run / "pretrain", "stylear.pretrain/1", status="complete",
        summary={"vqgan_psnr_db": 25.5, "base_content_accuracy": 0.75},
    )  # fmt: skip
    (run / "pretrain" / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 6.0 - 0.5 * s}) + "\n" for s in range(1, 6))
    )
    stage = run / "evaluate_world"
    stage.mkdir()
    metrics = {
        "base": _figures(0.02, 0.1, 0.2), "sft": _figures(0.7, 0.05, 0.95), "sft@noise=0": _figures(0.72, 0.2, 0.9)
    }  # fmt: skip
    (stage / "metrics.json").write_text(json.dumps(metrics))
    rows = [[Image.new("RGB", (64, 64), c)] * len(HELD_OUT_STYLES) for c in ROW_COLOURS]
    write_grid(rows, stage / "grid.png")
    write_manifest(stage, EVALUATE_WORLD_FORMAT, status="complete", config={"eval": EVAL}, summary={})
    write_manifest(
        run / "export", "stylear.export/1", status="complete", config={"adapter": "{run_dir}/train_dpo/adapter"},
        summary={"name": "stylear-mini"},
    )  # fmt: skip
    served = run / "served"
    served.mkdir()
    png = encode_png(Image.new("RGB", (64, 64), (9, 9, 9)))
    (served / "0_reference.png").write_bytes(png)
    (served / "1_reference.png").write_bytes(png)
    (served / "0_stylear-mini.png").write_bytes(png)
    (served / "0_base.png").write_bytes(png)
    record = {"endpoint": "/v1/generate/style", "prompt": "p", "status": 200, "seconds": 1.0, "seed": 1000}
    (served / "responses.json").write_text(
        json.dumps(
            {
                "format": SERVED_FORMAT, "url": "http://127.0.0.1:1", "adapters": ["stylear-mini"],
                "requests": [
                    {**record, "adapter": "stylear-mini", "reference": "0_reference.png", "image": "0_stylear-mini.png"},
                    {**record, "adapter": None, "reference": "0_reference.png", "image": "0_base.png"},
                    {**record, "adapter": None, "reference": "1_reference.png", "status": 504},
                ],
            }
        )
    )  # fmt: skip
    write_manifest(run, "stylear.pipeline/1", status="complete")
    return run


def test_world_report_renders_every_section_and_links_only_existing_images(tmp_path):
    run = _world_run(tmp_path)
    page = write_report(run).read_text()

    for heading in (
        "The miniature world's trained parts",
        "Held-out styles: accuracy per variant",
        "Ablation: style-token noise at inference",
        "Held-out styles: reference | each variant | served",
        "VQGAN reconstructions",
        "Training curves",
        "Served over HTTP",
    ):
        assert f"<h2>{heading}" in page, heading
    sources = re.findall(r'<img src="([^"]+)"', page)
    missing = [s for s in sources if not (run / s).is_file()]
    assert not missing, missing
    # One row per held-out style: reference + 3 variants each, the served pair 0 twice, 6 reconstructions x 2.
    grid_tiles = [s for s in sources if s.startswith("report/world/grid/")]
    assert len(grid_tiles) == len(HELD_OUT_STYLES) * (1 + len(VARIANTS))
    assert sources.count("served/0_stylear-mini.png") == 2 and sources.count("served/0_base.png") == 2
    assert "<th>served over HTTP: DPO adapter</th>" in page  # the export stage published train_dpo's
    assert len([s for s in sources if s.startswith("report/world/vqgan/")]) == 12
    # Each tile is cut from its own variant's row of the grid.
    for row, colour in zip(("reference", "base", "sft", "sft_noise0"), ROW_COLOURS):
        tile = Image.open(run / f"report/world/grid/{row}_3.png").convert("RGB")
        assert tile.size == (128, 128) and tile.getpixel((64, 64)) == colour, row
    # The accuracy table carries every judged figure, the colour judge and chance; the ablation its strengths.
    for label in ("palette (colour judge)", "leakage (reference&#x27;s object)", "<td>chance</td>"):
        assert label in page, label
    assert "<td>0.2 (default)</td>" in page and "<td>0</td>" in page
    assert "25.500" in page and "0.750" in page  # VQGAN PSNR and the base's content accuracy
    # The verdict reads the colour judge's palette: SFT 95% against the base's 20% and chance 17%.
    assert "<b>sft</b> draws the held-out reference's palette in 95% of pairs, against 20%" in page
    assert "<b>above</b> both" in page and "are rough here" not in page  # judges at 0.97 / 0.98
    first = held_out_pairs(WorldEvalConfig(**{k: v for k, v in EVAL.items() if k != "sampling"}))[0]
    assert first.content.prompt in page and first.style.style_id in page


def test_demo_sends_the_report_rows_held_out_pairs_with_the_runs_sampling(tmp_path):
    run = _world_run(tmp_path)
    jobs = served_requests(run, 3)
    pairs = held_out_pairs(WorldEvalConfig(prompts_per_style=1, seed=11))
    assert [(j["index"], j["adapter"]) for j in jobs] == [
        (i, a) for i in range(3) for a in ("stylear-mini", None)
    ]
    for job in jobs:
        pair = pairs[job["index"]]
        assert job["pair"]["prompt"] == pair.content.prompt
        assert job["pair"]["reference"] == encode_png(pair.reference)
        assert job["pair"]["sampling"]["noise_strength"] == 0.2

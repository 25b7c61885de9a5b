"""Style evaluation: the deterministic style statistics, scoring, generation with base vs tuned, the evaluate job."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from stylear_core.data.images import decode_image, encode_png
from stylear_core.data.schemas import EVAL_METRICS_SCHEMA, EVAL_SAMPLES_SCHEMA, schema_version
from stylear_core.data.synthetic import PALETTES, StyleSpec, render, sample_content
from stylear_core.evaluation.style_eval import (
    SCORE_COLUMNS,
    EvalSamplingConfig,
    HeldPairsConfig,
    StyleSample,
    code_map_image,
    code_similarity,
    evaluate_variant,
    held_pairs,
    palette_similarity,
    score_samples,
    summarize,
    write_style_eval,
)
from stylear_core.models.clip import ClipScorer
from stylear_core.models.presets import build_stylear_model, build_vqgan
from stylear_core.models.vqgan import encode_images
from stylear_core.runs import read_manifest
from stylear_core.testing.fixtures import tiny_adapter, tiny_model_cfg

TINY = tiny_model_cfg()
SAMPLING = EvalSamplingConfig(samples_per_pair=2, top_k=64)


def test_palette_similarity_prefers_the_same_palette_over_every_other():
    rng = random.Random(0)
    a_content, b_content = sample_content(rng), sample_content(rng)
    for palette in PALETTES:
        # Same palette, different content, background texture and stroke: still the closest palette.
        a = render(a_content, StyleSpec(palette, "stripes", "filled"))
        same = palette_similarity(a, render(b_content, StyleSpec(palette, "dots", "outline")))
        others = [
            palette_similarity(a, render(b_content, StyleSpec(other, "dots", "outline")))
            for other in PALETTES
            if other != palette
        ]
        assert same > max(others), palette
    assert palette_similarity(a, a) == pytest.approx(1.0)


def test_code_similarity_is_the_shared_share_of_codes():
    a = np.array([[0, 0], [1, 2]])
    b = np.array([[0, 1], [1, 3]])
    # a: {0: .5, 1: .25, 2: .25}; b: {0: .25, 1: .5, 3: .25} -> min-sum .25 + .25
    assert code_similarity(a, b, 8) == pytest.approx(0.5)
    assert code_similarity(a, a, 8) == pytest.approx(1.0)
    assert code_similarity(a, np.full((2, 2), 7), 8) == 0.0


def test_code_map_colours_depend_only_on_the_code():
    image = np.asarray(code_map_image(np.array([[3, 3], [4, 200]]), 256, cell=4))
    assert image.shape == (8, 8, 3)
    assert (image[0, 0] == image[0, 4]).all()  # code 3 twice: one colour
    assert not (image[0, 0] == image[4, 0]).all() and not (image[4, 0] == image[4, 4]).all()


def test_held_pairs_are_not_the_training_rows_and_need_two_styles():
    held = held_pairs(HeldPairsConfig(count=6, num_styles=3, seed=2), 64)
    train = held_pairs(HeldPairsConfig(count=6, num_styles=3, seed=0), 64)
    assert len(held) == 6 and len({p["style_ref"] for p in held}) > 1
    assert not {p["prompt"] for p in held} & {p["prompt"] for p in train}
    with pytest.raises(ValueError, match="num_styles"):
        held_pairs(HeldPairsConfig(count=4, num_styles=1), 64)


@pytest.fixture(scope="module")
def clip_scorer():
    torch.manual_seed(1)
    return ClipScorer.from_preset("tiny")


def test_a_sample_equal_to_its_reference_scores_top_marks(clip_scorer):
    pairs = held_pairs(HeldPairsConfig(count=6, num_styles=3), 64)
    vq = build_vqgan(TINY, build_stylear_model(TINY).vocab)
    refs = [decode_image(p["style_image"]) for p in pairs]
    codes = encode_images(vq, refs, 64).numpy()
    samples = [
        StyleSample(ref, c, ref, c, p["prompt"], p["style_ref"]) for ref, c, p in zip(refs, codes, pairs)
    ]
    scores = score_samples(samples, clip_scorer, vq.codebook_size)
    assert set(scores) == set(SCORE_COLUMNS)
    np.testing.assert_allclose(scores["code_style"], 1.0)
    np.testing.assert_allclose(scores["palette"], 1.0, atol=1e-6)
    np.testing.assert_allclose(scores["clip_style"], 1.0, atol=1e-4)
    # Each style's codes and colours differ from the other styles', so the margins are positive.
    assert (scores["code_margin"] > 0).all() and (scores["palette_margin"] > 0).all()


def _adapter(tmp: Path, model, name: str) -> Path:
    return tiny_adapter(tmp / name, TINY, model=model, perturb=())


def test_evaluate_variant_is_deterministic_and_an_adapter_changes_what_is_generated(tmp_path, clip_scorer):
    pairs = held_pairs(HeldPairsConfig(count=3, num_styles=2), 64)
    base = evaluate_variant("base", None, TINY, pairs, SAMPLING, "cpu")
    again = evaluate_variant("base", None, TINY, pairs, SAMPLING, "cpu")
    assert len(base) == 3 * SAMPLING.samples_per_pair
    assert [r["png"] for r in base] == [r["png"] for r in again]
    model = build_stylear_model(TINY)
    with torch.no_grad():
        for p in model.lora_parameters():
            p.add_(torch.randn_like(p) * 0.5)
    tuned = evaluate_variant("tuned", str(_adapter(tmp_path, model, "tuned")), TINY, pairs, SAMPLING, "cpu")
    assert [r["seed"] for r in tuned] == [r["seed"] for r in base]  # same seeds: only the model differs
    assert [r["codes_png"] for r in tuned] != [r["codes_png"] for r in base]
    for row in tuned:
        assert Image.open(io.BytesIO(row["png"])).size == (64, 64)
        assert 0.0 <= row["code_style"] <= 1.0 and 0.0 <= row["palette"] <= 1.0


def test_training_on_the_style_data_raises_the_code_style_score(tmp_path):
    """The headline statistic must reward learning: a few plain optimizer steps on synthetic styled rows
    move the generated codes towards the references' codes."""
    from stylear_core.models.presets import build_prompt_tokenizer
    from stylear_core.training.batches import TokenBatchCollate
    from stylear_core.training.synthetic_shards import synthetic_token_rows

    model = build_stylear_model(TINY).train()
    rows = synthetic_token_rows(TINY, 16, seed=0, num_styles=4)
    collate = TokenBatchCollate(model.vocab, build_prompt_tokenizer(TINY, model.vocab), TINY.num_style_tokens)
    batch = {k: np.array([r[k] for r in rows]) for k in ("id", "prompt", "height", "width")}
    for k in ("prompt_ids", "image_tokens"):  # list columns arrive as object arrays of int arrays
        batch[k] = np.empty(len(rows), dtype=object)
        batch[k][:] = [np.asarray(r[k], dtype=np.int64) for r in rows]
    batch = collate(batch)
    style_pixels = model.style_encoder.preprocess([decode_image(r["image"]) for r in rows])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(25):
        out = model(batch["prompt_ids"], batch["image_tokens"], style_pixels=style_pixels,
                    prompt_mask=batch["prompt_mask"], image_mask=batch["image_mask"])  # fmt: skip
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    model.eval()
    pairs = held_pairs(HeldPairsConfig(count=4, num_styles=2), 64)
    base = evaluate_variant("base", None, TINY, pairs, SAMPLING, "cpu")
    tuned = evaluate_variant("tuned", str(_adapter(tmp_path, model, "tuned")), TINY, pairs, SAMPLING, "cpu")
    summary = summarize(base + tuned, {"base": None, "tuned": "x"})
    assert summary["delta_tuned_minus_base"]["code_style"] > 0.05
    assert summary["style_improved"]


def _rows(variant: str, score: float) -> list[dict]:
    png = encode_png(Image.new("RGB", (8, 8)))
    return [
        {
            "variant": variant, "pair_id": f"p{i}", "prompt": "a red circle", "style_ref": f"s{i % 2}",
            "sample": 0, "seed": i, "png": png, "codes_png": png, "reference_png": png,
            "reference_codes_png": png, "style_png": png,
            **{name: score for name in SCORE_COLUMNS},
        }
        for i in range(4)
    ]  # fmt: skip


def test_summarize_and_write_give_versioned_tables_and_the_deltas(tmp_path):
    rows = _rows("base", 0.1) + _rows("dpo", 0.4)
    summary = summarize(rows, {"base": None, "dpo": "/a/dpo"}, tuned="dpo")
    assert summary["delta_tuned_minus_base"]["code_style"] == pytest.approx(0.3)
    assert summary["style_improved"] and summary["per_style"]["dpo"]["s1"]["palette"] == pytest.approx(0.4)
    assert not summarize(_rows("base", 0.4) + _rows("dpo", 0.1), {"base": None, "dpo": "x"})["style_improved"]
    paths = write_style_eval(tmp_path, rows, summary)
    samples, metrics = pq.read_table(paths["samples"]), pq.read_table(paths["metrics"])
    assert schema_version(samples.schema) == schema_version(EVAL_SAMPLES_SCHEMA) == "stylear.eval_samples/1"
    assert schema_version(metrics.schema) == schema_version(EVAL_METRICS_SCHEMA)
    assert metrics.column("variant").to_pylist() == ["base", "dpo"]
    assert metrics.column("adapter").to_pylist() == [None, "/a/dpo"]
    for rel in samples.column("image_path").to_pylist() + samples.column("codes_path").to_pylist():
        assert (tmp_path / rel).is_file()
    assert json.loads(paths["json"].read_text())["tuned"] == "dpo"


def test_evaluate_job_writes_tables_manifest_and_report(ray_session, tmp_path):
    import jobs.evaluate as job

    run = tmp_path / "run"
    model = build_stylear_model(TINY)
    with torch.no_grad():
        for p in model.lora_parameters():
            p.add_(torch.randn_like(p) * 0.3)
    _adapter(run / "train_dpo", model, "adapter")
    config = Path(__file__).resolve().parents[2] / "jobs/configs/evaluate/tiny.yaml"
    summary = job.main(
        ["--config", str(config), f"run_dir={run}", f"output_dir={run}/evaluate",
         "adapters={dpo: '{run_dir}/train_dpo/adapter'}", "pairs.count=2", "pairs.num_styles=2",
         "sampling.samples_per_pair=1"]
    )  # fmt: skip
    manifest = read_manifest(run / "evaluate")
    assert manifest["status"] == "complete" and manifest["format"] == "stylear.evaluate/1"
    assert summary["samples"] == 4 and set(summary) >= {
        "base_code_style",
        "dpo_code_style",
        "delta_code_style",
    }
    assert pq.read_table(run / "evaluate" / "metrics.parquet").column("variant").to_pylist() == [
        "base",
        "dpo",
    ]
    report = (run / "report.html").read_text()
    assert "Style evaluation" in report and "dpo" in report


def _write_pairs(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _style_png(palette: str, seed: int, side: int = 96) -> bytes:
    content = sample_content(random.Random(seed))
    return encode_png(render(content, StyleSpec(palette, "stripes", "filled"), size=side))


def test_own_held_pairs_are_read_checked_and_evaluated(tmp_path):
    """A user's own (prompt, reference) rows replace the procedural pairs: references come back at the
    model's size, ids become safe file stems, a missing style_ref makes each image its own style, and
    the base model generates and scores every pair."""
    first, second = list(PALETTES)[:2]
    red, blue = _style_png(first, 0), _style_png(second, 1)
    rows = [
        {"id": "../../etc/passwd", "prompt": "a red circle on the left", "style_image": red},
        {"id": "own-2", "prompt": "a blue square in the centre", "style_image": blue},
        {"id": "own-2", "prompt": "a green star on the right", "style_image": red},
    ]
    pairs = held_pairs(HeldPairsConfig(path=str(_write_pairs(tmp_path / "own.parquet", rows))), 64)
    assert [p["prompt"] for p in pairs] == [r["prompt"] for r in rows]
    assert [p["id"] for p in pairs] == ["_etc_passwd", "own-2", "pair-00002"]
    assert pairs[0]["style_ref"] == pairs[2]["style_ref"] != pairs[1]["style_ref"]
    assert all(decode_image(p["style_image"]).size == (64, 64) for p in pairs)
    assert len(held_pairs(HeldPairsConfig(path=str(tmp_path / "own.parquet"), count=2), 64)) == 2

    scored = evaluate_variant("base", None, TINY, pairs, SAMPLING, "cpu")
    assert [r["pair_id"] for r in scored] == [
        p["id"] for p in pairs for _ in range(SAMPLING.samples_per_pair)
    ]
    assert all(0.0 <= r["code_style"] <= 1.0 for r in scored)

    bad = [
        ([{"prompt": "x", "style_image": red}, {"prompt": "y", "style_image": red}], "at least 2 styles"),
        ([{"prompt": "x", "style_image": b"not an image"}], "style_image"),
        ([{"prompt": " ", "style_image": red}], "empty prompt"),
        ([{"text": "x", "style_image": red}], "missing column"),
    ]
    for n, (table, message) in enumerate(bad):
        with pytest.raises(ValueError, match=message):
            held_pairs(HeldPairsConfig(path=str(_write_pairs(tmp_path / f"bad{n}.parquet", table))), 64)

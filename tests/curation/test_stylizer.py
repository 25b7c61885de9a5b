"""Stylizer: tiny random SDXL + IP-Adapter in the real layouts, loaded by path, InstantStyle style-only."""

from __future__ import annotations

import io
import json
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from stylear_core.curation.stylizer import (
    Stylizer,
    StylizerConfig,
    instantstyle_scale,
    row_seed,
)
from stylear_core.data.schemas import CURATED_SCHEMA, STYLIZER_OUTPUT_SCHEMA, conform_table
from stylear_core.data.synthetic import SyntheticStyleSet, corrupt_bytes
from stylear_core.testing.tiny_stylizer import build_tiny_sdxl_stylizer_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_sdxl")
    return root, build_tiny_sdxl_stylizer_dir(root, seed=0)


@pytest.fixture(scope="module")
def stylizer(tiny_dir):
    return Stylizer(tiny_dir[1])


@pytest.fixture(scope="module")
def requests():
    return SyntheticStyleSet(seed=0, size=64).stylization_requests(4, num_styles=4)


def as_batch(rows, **overrides):
    batch = {
        k: np.array([r[k] for r in rows], dtype=object) for k in ("id", "prompt", "style_image", "style_ref")
    }
    batch["seed"] = np.array([r["seed"] for r in rows], dtype=np.int64)
    batch.update(overrides)
    return batch


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)


def test_tiny_dir_has_the_real_layouts(tiny_dir):
    root, cfg = tiny_dir
    index = json.loads((root / "sdxl" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert {"unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"} <= set(
        index
    )
    adapter = root / "ip_adapter" / "sdxl_models"
    assert (adapter / "ip-adapter_sdxl.safetensors").is_file()
    assert (adapter / "image_encoder" / "config.json").is_file()
    assert (
        cfg.ip_adapter_weight_name == "ip-adapter_sdxl.safetensors"
        and cfg.ip_adapter_subfolder == "sdxl_models"
    )


def test_style_scale_on_the_style_block_only(stylizer):
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    procs = {
        n: p
        for n, p in stylizer.pipe.unet.attn_processors.items()
        if isinstance(p, IPAdapterAttnProcessor2_0)
    }
    assert len(procs) >= 6  # every cross-attention got an IP-Adapter processor from load_ip_adapter
    for name, proc in procs.items():
        expected = 1.0 if name.startswith("up_blocks.0.attentions.1.") else 0.0
        assert proc.scale == [expected], name
    assert instantstyle_scale(0.7, layout_scale=0.5) == {
        "up": {"block_0": [0.0, 0.7, 0.0]},
        "down": {"block_2": [0.0, 0.5]},
    }


def test_images_have_the_configured_size_and_columns(stylizer, requests):
    table = stylizer(as_batch(requests[:2]))
    assert table.schema.equals(STYLIZER_OUTPUT_SCHEMA)
    # Successful rows are curated records once the CLIP filter adds its score.
    scored = table.append_column("clip_text_score", pa.nulls(2, pa.float32()))
    assert conform_table(scored, CURATED_SCHEMA).num_rows == 2
    out = table.to_pydict()
    assert list(out["id"]) == [r["id"] for r in requests[:2]]
    assert list(out["prompt"]) == [r["prompt"] for r in requests[:2]]
    assert list(out["style_ref"]) == [r["style_ref"] for r in requests[:2]]
    assert list(out["error"]) == [None, None] and list(out["source"]) == ["stylized"] * 2
    assert list(out["width"]) == [64, 64] and list(out["height"]) == [64, 64]
    assert "style_image" not in out  # only the prompt and the stylized image are kept
    for data in out["image"]:
        img = Image.open(io.BytesIO(data))
        assert img.format == "PNG" and img.size == (64, 64)


def test_seeds_decide_the_image(stylizer, requests):
    row = requests[0]
    rows = [row, row, row]
    seeds = np.array([11, 12, 11], dtype=np.int64)
    first = stylizer(as_batch(rows, seed=seeds)).to_pydict()
    again = stylizer(as_batch(rows, seed=seeds)).to_pydict()
    assert list(first["image"]) == list(again["image"])  # same batch, same bytes
    a, b, c = (pixels(x) for x in first["image"])
    assert np.abs(a - b).mean() > 5.0  # different seed, different image
    # Same seed in another batch position: the same image (allowing one grey level of kernel rounding).
    assert np.abs(a - c).max() <= 1.0
    assert list(first["seed"]) == [11, 12, 11]


def test_style_image_steers_the_style_block(stylizer, requests):
    a, b = requests[0], dict(requests[0])
    b["style_image"] = requests[1]["style_image"]
    assert a["style_image"] != b["style_image"]
    out = stylizer(as_batch([a, b])).to_pydict()
    assert np.abs(pixels(out["image"][0]) - pixels(out["image"][1])).mean() > 1.0
    # Each row sees only its own reference (the stock pipeline would share them across the batch).
    alone = stylizer(as_batch([b])).to_pydict()
    assert np.abs(pixels(out["image"][1]) - pixels(alone["image"][0])).max() <= 1.0
    stylizer.pipe.set_ip_adapter_scale(0.0)
    try:
        off = stylizer(as_batch([a, b])).to_pydict()
    finally:
        stylizer.pipe.set_ip_adapter_scale(instantstyle_scale(stylizer.cfg.style_scale))
    assert (
        np.abs(pixels(off["image"][0]) - pixels(off["image"][1])).mean() < 0.5
    )  # the reference no longer counts


def test_each_row_gets_its_own_reference_without_guidance(tiny_dir, requests):
    # Without CFG the embeddings are laid out (batch, 1, ...) instead of (2 * batch, 1, ...).
    plain = Stylizer(replace(tiny_dir[1], guidance_scale=1.0))
    a, b = requests[0], dict(requests[0])
    b["style_image"] = requests[1]["style_image"]
    pair = plain(as_batch([a, b])).to_pydict()
    alone = plain(as_batch([b])).to_pydict()
    assert np.abs(pixels(pair["image"][0]) - pixels(pair["image"][1])).mean() > 1.0
    assert np.abs(pixels(pair["image"][1]) - pixels(alone["image"][0])).max() <= 1.0


def test_bad_rows_become_error_rows(stylizer, requests):
    rows = [dict(r) for r in requests[:3]]
    rows[0]["style_image"] = corrupt_bytes("truncated")
    rows[2]["prompt"] = "  "
    table = stylizer(as_batch(rows))
    assert table.schema.equals(
        STYLIZER_OUTPUT_SCHEMA
    )  # typed, so batches with and without errors concatenate
    out = table.to_pydict()
    assert out["error"][0].startswith("style image:") and out["image"][0] is None and out["width"][0] is None
    assert out["error"][2] == "empty prompt" and out["image"][2] is None
    assert out["error"][1] is None and Image.open(io.BytesIO(out["image"][1])).size == (64, 64)


def test_generation_failure_is_isolated_per_row(stylizer, requests, monkeypatch):
    real_generate = stylizer.generate

    def fail_on_second(prompts, styles, seeds):
        if requests[1]["prompt"] in prompts:
            raise RuntimeError("out of memory")
        return real_generate(prompts, styles, seeds)

    monkeypatch.setattr(stylizer, "generate", fail_on_second)
    out = stylizer(as_batch(requests[:2])).to_pydict()
    assert out["error"][0] is None and out["image"][0] is not None
    assert "out of memory" in out["error"][1] and out["image"][1] is None


def test_missing_seed_comes_from_the_id_and_tables_are_batches(stylizer, requests):
    batch = as_batch(requests[:1])
    del batch["seed"]
    out = stylizer(batch).to_pydict()
    assert out["seed"][0] == row_seed(requests[0]["id"], stylizer.cfg.base_seed)
    # Ray Data may hand the batch over as a pyarrow table.
    assert stylizer(pa.table(batch)).to_pydict() == out


def test_needs_local_paths():
    with pytest.raises(ValueError, match="pipeline_path"):
        Stylizer(StylizerConfig())

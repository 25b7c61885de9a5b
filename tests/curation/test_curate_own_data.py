"""Curation of a user's own raw pairs, and its token shards as training input.

A user with only raw (prompt, image) pairs switches stylization off: every readable raw pair is curated
(the raw : stylized ratio has nothing to apply to), and the token shards carry each row's working-size
image, so SFT with ``style_source=image`` trains from them directly. A run that asks for stylized pairs
and gets none stops with a reason instead of writing an empty or raw-only curated set.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from stylear_core.config import load_config
from stylear_core.curation.config import CurationConfig
from stylear_core.curation.pipeline import NoStylizedPairsError, run_curation
from stylear_core.data.images import center_crop_resize, decode_image, encode_png
from stylear_core.data.layout import ImageTokenLayout
from stylear_core.data.passes import read_table, table_files
from stylear_core.data.schemas import (
    RAW_PAIRS_SCHEMA,
    TOKEN_SHARDS_SCHEMA,
    SchemaError,
    rows_to_table,
    schema_version,
    validate_table,
)
from stylear_core.data.synthetic import SyntheticStyleSet, corrupt_bytes
from stylear_core.data.tokenizer import ByteTokenizer
from stylear_core.models.backbone import tiny_vocab
from stylear_core.models.clip import ClipVisionTower
from stylear_core.models.vqgan import encode_images, tiny_vqgan
from stylear_core.training.batches import (
    TOKEN_SHARD_COLUMNS,
    TokenBatchCollate,
    id_hash,
    read_parquet_dataset,
)
from stylear_core.training.objectives import StyleSFTObjective

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "jobs" / "configs" / "curate" / "tiny.yaml"
NUM_RAW = 12
SIZE = 64


def _config(out: Path, cache: Path, *overrides: str) -> CurationConfig:
    return load_config(
        CurationConfig,
        TINY,
        [
            f"output_dir={out}",
            f"run_dir={out.parent}",
            f"cache_dir={cache}",
            "progress_bars=false",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def own_data(ray_session, tmp_path_factory) -> dict:
    """A raw-only curation run over 12 raw pairs (one wide image, one corrupt)."""
    root = tmp_path_factory.mktemp("own-data")
    rows = SyntheticStyleSet(seed=3, size=SIZE).raw_pairs(NUM_RAW)
    # A wide image: the shards must hold its centre square at the working size, as the VQGAN saw it.
    wide = Image.new("RGB", (96, 64), (250, 0, 0))
    wide.paste((0, 0, 250), (16, 0, 80, 64))
    rows[0]["image"] = encode_png(wide)
    rows[1]["image"] = corrupt_bytes("truncated", seed=1)
    pq.write_table(rows_to_table(rows, RAW_PAIRS_SCHEMA), root / "raw.parquet")
    out = root / "run" / "curate"
    cfg = _config(out, root / "cache", f"inputs.raw_path={root / 'raw.parquet'}", "stylize=false")
    summary = run_curation(cfg)
    return {"out": out, "summary": summary, "rows": rows, "cfg": cfg}


def test_own_raw_pairs_alone_are_all_curated(own_data):
    curated = read_table(own_data["out"] / "curated")
    assert curated is not None
    good = {r["id"] for r in own_data["rows"][2:]} | {own_data["rows"][0]["id"]}
    assert set(curated.column("id").to_pylist()) == good  # all but the corrupt one
    assert set(curated.column("source").to_pylist()) == {"raw"}
    summary = own_data["summary"]
    assert summary["mix"]["mode"] == "raw_only" and summary["mix"]["curated_raw"] == NUM_RAW - 1
    assert summary["requests_in"] == summary["stylized"] == 0 and summary["tokens_written"] == NUM_RAW - 1
    assert summary["errors_by_stage"] == {"decode": 1}
    manifest = json.loads((own_data["out"] / "manifest.json").read_text())
    assert manifest["status"] == "complete"


def test_token_shards_carry_the_working_size_image(own_data):
    files = table_files(own_data["out"] / "tokens")
    assert files
    for f in files:
        assert (
            schema_version(pq.read_schema(f))
            == schema_version(TOKEN_SHARDS_SCHEMA)
            == "stylear.token_shards/2"
        )
        validate_table(pq.read_table(f), TOKEN_SHARDS_SCHEMA, allow_extra_columns=False)
    tokens = read_table(own_data["out"] / "tokens").to_pylist()
    curated = {r["id"]: r for r in read_table(own_data["out"] / "curated").to_pylist()}
    vocab = tiny_vocab(codebook_size=256)
    layout = ImageTokenLayout.for_resolution(SIZE, SIZE, vocab)
    images = [decode_image(t["image"]) for t in tokens]
    for t, image in zip(tokens, images):
        assert t["image"][:8] == b"\x89PNG\r\n\x1a\n" and image.size == (SIZE, SIZE)
        expected = center_crop_resize(decode_image(curated[t["id"]]["image"]), SIZE, SIZE)
        assert image.tobytes() == expected.tobytes()
    # The stored image is exactly what was tokenized: its VQ codes are the row's image tokens.
    codes = layout.decode(torch.tensor([t["image_tokens"] for t in tokens]))
    assert torch.equal(encode_images(tiny_vqgan(seed=0), images, SIZE), codes)
    wide = next(im for t, im in zip(tokens, images) if t["id"] == own_data["rows"][0]["id"])
    assert wide.getpixel((0, 0)) == wide.getpixel((SIZE - 1, SIZE - 1)) == (0, 0, 250)  # centre square: blue


def test_sft_batch_with_style_source_image_reads_the_curated_shards(own_data):
    model_cfg = own_data["cfg"].model
    dataset = read_parquet_dataset(str(own_data["out"] / "tokens"), [*TOKEN_SHARD_COLUMNS, "image"])
    objective = StyleSFTObjective(model_cfg, style_source="image")
    module = objective.setup(torch.device("cpu"), "fp32")
    assert objective.vqgan is None  # no VQ round trip: CLIP sees the real images
    batch = next(iter(dataset.iter_torch_batches(batch_size=4, collate_fn=objective.collate_fn())))
    assert batch["style_pixels"].shape[0] == batch["image_tokens"].shape[0] == 4
    by_hash = {id_hash(r["id"]): r for r in read_table(own_data["out"] / "tokens").to_pylist()}
    first = by_hash[batch["id_hash"][0].item()]
    encoder = objective.model.style_encoder
    assert torch.allclose(batch["style_pixels"][0], encoder.preprocess([decode_image(first["image"])])[0])
    result = objective.compute(module, batch)
    assert torch.isfinite(result.loss) and result.loss.item() > 0


def test_old_token_shards_without_images_read_for_vq_decode_and_fail_clearly_for_image(own_data, tmp_path):
    table = read_table(own_data["out"] / "tokens").drop_columns(["image"])
    old = table.replace_schema_metadata({b"schema_version": b"stylear.token_shards/1"})
    (tmp_path / "tokens").mkdir()
    pq.write_table(old, tmp_path / "tokens" / "part-0.parquet")
    ds = read_parquet_dataset(str(tmp_path / "tokens"), TOKEN_SHARD_COLUMNS)
    assert ds.count() == old.num_rows
    vocab = tiny_vocab(codebook_size=256)
    batch = ds.take_batch(3, batch_format="numpy")
    assert TokenBatchCollate(vocab, ByteTokenizer(vocab), 4)(batch)["image_tokens"].shape[0] == 3
    encoder = ClipVisionTower.from_preset("tiny")
    with pytest.raises(SchemaError, match=r"no 'image' column.*style_source: vq_decode"):
        TokenBatchCollate(vocab, ByteTokenizer(vocab), 4, encoder.preprocess)(batch)
    with pytest.raises(SchemaError, match=r"stylear\.token_shards/1.*'image'.*style_source"):
        read_parquet_dataset(str(tmp_path / "tokens"), [*TOKEN_SHARD_COLUMNS, "image"])
    with pytest.raises(SchemaError, match=r"stylear\.token_shards/1"):
        validate_table(old, TOKEN_SHARDS_SCHEMA)


def test_stylization_asked_for_but_none_made_stops_with_a_reason(ray_session, tmp_path):
    data = SyntheticStyleSet(seed=4, size=SIZE)
    pq.write_table(rows_to_table(data.raw_pairs(6), RAW_PAIRS_SCHEMA), tmp_path / "raw.parquet")
    requests = data.stylization_requests(3, num_styles=1)
    for k, r in enumerate(requests):  # every request fails in the stylizer
        r["style_image"] = corrupt_bytes("random", seed=k)
    pq.write_table(pa.Table.from_pylist(requests), tmp_path / "requests.parquet")
    no_references = pa.table({"id": pa.array([], pa.string()), "image": pa.array([], pa.binary())})
    pq.write_table(no_references, tmp_path / "references.parquet")  # no SAM work here
    out = tmp_path / "run" / "curate"
    cfg = _config(
        out,
        tmp_path / "cache",
        f"inputs.raw_path={tmp_path / 'raw.parquet'}",
        f"inputs.requests_path={tmp_path / 'requests.parquet'}",
        f"inputs.references_path={tmp_path / 'references.parquet'}",
    )
    with pytest.raises(NoStylizedPairsError, match=r"3 stylization request.*stylize: 3.*stylize=false"):
        run_curation(cfg)
    assert read_table(out / "curated") is None and read_table(out / "tokens") is None
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "no stylized pair" in manifest["error"]

"""The curation job end to end on a local Ray cluster: tables and schemas, mix ratio, bad rows, reruns.

One run of ``jobs.curate.main`` with the tiny config feeds parquet inputs in which 5% of the images
are corrupt (plus one duplicated raw id); the tests below inspect its output, rerun it on the same
output directory, and resume a copy of it after simulating a crash.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import jobs.curate
from stylear_core.curation.config import InputConfig
from stylear_core.curation.inputs import load_inputs
from stylear_core.curation.mix import selection_key
from stylear_core.curation.pipeline import preference_hold_out
from stylear_core.data.images import decode_image
from stylear_core.data.layout import ImageTokenLayout
from stylear_core.data.passes import read_table, table_files
from stylear_core.data.schemas import (
    RAW_PAIRS_SCHEMA,
    TABLE_SCHEMAS,
    SchemaError,
    rows_to_table,
    schema_version,
    validate_table,
)
from stylear_core.data.synthetic import SyntheticStyleSet, corrupt_bytes
from stylear_core.data.tokenizer import ByteTokenizer
from stylear_core.models.backbone import tiny_vocab
from stylear_core.models.vqgan import encode_images, tiny_vqgan
from stylear_core.runs import read_manifest, write_manifest

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "jobs" / "configs" / "curate" / "tiny.yaml")
NUM_RAW, NUM_REQUESTS = 80, 20
PREFERENCE_FRACTION = 0.15  # holds out 2 of the 20 requests
CORRUPT_KINDS = ("truncated", "random", "empty", "header")


def _write_inputs(root: Path) -> dict:
    """Raw pairs and stylization requests as parquet, 5% of each with corrupt image bytes."""
    data = SyntheticStyleSet(seed=0, size=64)
    raw = data.raw_pairs(NUM_RAW)
    # Corrupt the raw ids the mix ranks first, so they are surely picked and decoded.
    ranked = sorted((r["id"] for r in raw), key=lambda i: selection_key(i, 0))
    corrupt_raw = ranked[: NUM_RAW // 20]
    for k, r in enumerate(r for r in raw if r["id"] in corrupt_raw):
        r["image"] = corrupt_bytes(CORRUPT_KINDS[k % len(CORRUPT_KINDS)], seed=k)
    # One id twice: both rows are unusable, and must be reported.
    duplicated = raw[-2]["id"]
    raw[-1]["id"] = duplicated
    pq.write_table(rows_to_table(raw, RAW_PAIRS_SCHEMA), root / "raw.parquet")

    requests = data.stylization_requests(NUM_REQUESTS, num_styles=4)
    held = preference_hold_out([r["id"] for r in requests], PREFERENCE_FRACTION, seed=0)
    # Corrupt a request whose style is not seen first in it, so every style reference stays readable.
    seen, corrupt_request = set(), None
    for r in requests:
        if r["style_ref"] in seen and corrupt_request is None and r["id"] not in held:
            corrupt_request = r["id"]
            r["style_image"] = corrupt_bytes("truncated", seed=99)
        seen.add(r["style_ref"])
    pq.write_table(pa.Table.from_pylist(requests), root / "requests.parquet")
    return {
        "held": held,
        "corrupt_raw": corrupt_raw,
        "corrupt_request": corrupt_request,
        "duplicated": duplicated,
        "root": root,
    }


def _argv(out: Path, inputs: dict, cache: Path) -> list[str]:
    root = inputs["root"]
    return [
        "--config",
        TINY,
        f"output_dir={out}",
        f"run_dir={out.parent}",
        f"cache_dir={cache}",
        f"inputs.raw_path={root / 'raw.parquet'}",
        f"inputs.requests_path={root / 'requests.parquet'}",
        f"preference_fraction={PREFERENCE_FRACTION}",
    ]


def _snapshot(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.rglob("*.parquet"))}


@pytest.fixture(scope="module")
def run(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("curate")
    inputs = _write_inputs(root)
    out = root / "run" / "curate"
    argv = _argv(out, inputs, root / "cache")
    summary = jobs.curate.main(argv)
    return {"out": out, "summary": summary, "argv": argv, **inputs}


def _table(run, name: str) -> pa.Table:
    table = read_table(run["out"] / name)
    assert table is not None, f"no {name} files"
    return table


def test_every_table_is_written_with_its_versioned_schema(run):
    for name, schema in TABLE_SCHEMAS.items():
        files = table_files(run["out"] / name)
        assert files, f"{name}/ has no parquet files"
        for f in files:
            file_schema = pq.read_schema(f)
            assert schema_version(file_schema) == schema_version(schema), f
            assert file_schema.equals(schema, check_metadata=False), f"{f}: {file_schema}"
            validate_table(pq.read_table(f), schema, allow_extra_columns=False)
    manifest = (run["out"] / "manifest.json").read_text()
    assert '"status": "complete"' in manifest and '"format": "stylear.curate/1"' in manifest


def test_curated_set_mixes_raw_and_stylized_at_the_configured_ratio(run):
    curated = _table(run, "curated")
    ids = curated.column("id").to_pylist()
    assert len(ids) == len(set(ids))
    sources = Counter(curated.column("source").to_pylist())
    assert sources["stylized"] >= 5
    assert abs(sources["raw"] / sources["stylized"] - 3.0) <= 0.05 * 3.0
    stylized = curated.filter(pa.compute.equal(curated.column("source"), "stylized"))
    # Every stylized pair that passed the CLIP filter is in the mix, with its score, reference and seed.
    assert set(stylized.column("id").to_pylist()) == set(_table(run, "stylized").column("id").to_pylist())
    assert min(stylized.column("clip_text_score").to_pylist()) >= -0.15
    assert stylized.column("style_ref").null_count == 0 and stylized.column("seed").null_count == 0
    summary = run["summary"]
    assert summary["mix"]["curated_raw"] == sources["raw"] and summary["written"] == len(ids)
    # Each request is stylized, filtered, failed (1) or held out for preference sampling.
    assert summary["stylized"] + summary["filtered"] + 1 + len(run["held"]) == NUM_REQUESTS


def test_every_bad_input_is_in_the_errors_table_with_a_reason(run):
    errors = _table(run, "errors").to_pylist()
    by_id = {(e["id"], e["stage"]): e for e in errors}
    for raw_id in run["corrupt_raw"]:
        entry = by_id[(raw_id, "decode")]
        assert entry["reason"] and entry["input_ref"].endswith("raw.parquet")
    assert "style image" in by_id[(run["corrupt_request"], "stylize")]["reason"]
    assert "2 times" in by_id[(run["duplicated"], "read:raw")]["reason"]
    filtered = [e for e in errors if e["stage"] == "clip_filter"]
    assert all("below threshold" in e["reason"] for e in filtered)
    summary = run["summary"]
    assert summary["failed"] == len(run["corrupt_raw"]) + 2  # + the corrupt request and the duplicate
    assert summary["filtered"] == len(filtered)
    curated_ids = set(_table(run, "curated").column("id").to_pylist())
    assert not curated_ids & {*run["corrupt_raw"], run["corrupt_request"], run["duplicated"]}


def test_held_out_requests_are_copied_for_preference_sampling_and_not_stylized(run):
    assert len(run["held"]) == 2
    held = {r["id"]: r for r in _table(run, "preference_requests").to_pylist()}
    assert set(held) == run["held"]
    inputs = {r["id"]: r for r in pq.read_table(run["root"] / "requests.parquet").to_pylist()}
    for i, row in held.items():
        assert row == {k: inputs[i][k] for k in row}
    touched = {r["id"] for r in _table(run, "errors").to_pylist()} | set(
        _table(run, "stylized")["id"].to_pylist()
    )
    assert not touched & run["held"]


def test_masks_cover_each_style_reference(run):
    masks = _table(run, "masks").to_pylist()
    refs = {r["style_ref"] for r in pq.read_table(run["root"] / "requests.parquet").to_pylist()}
    assert {m["id"] for m in masks} == refs
    for m in masks:
        mask = decode_image(m["mask"])
        assert mask.size == decode_image(m["cleaned_image"]).size == (64, 64)
        assert 0.0 < m["kept_fraction"] < 1.0


def test_token_rows_decode_to_the_vqgan_codes_of_the_curated_images(run):
    curated = {r["id"]: r for r in _table(run, "curated").to_pylist()}
    tokens = _table(run, "tokens").to_pylist()
    assert {t["id"] for t in tokens} == set(curated)
    vocab = tiny_vocab(codebook_size=256)
    layout = ImageTokenLayout.for_resolution(64, 64, vocab)
    codes = layout.decode(torch.tensor([t["image_tokens"] for t in tokens]))
    vq = tiny_vqgan(seed=0)
    expected = encode_images(vq, [decode_image(curated[t["id"]]["image"]) for t in tokens], 64)
    assert torch.equal(codes, expected)
    tokenizer = ByteTokenizer(vocab)
    for t in tokens:
        assert t["source"] == curated[t["id"]]["source"] and t["prompt"] == curated[t["id"]]["prompt"]
        assert t["prompt"] in tokenizer.decode(t["prompt_ids"])
        assert t["prompt_ids"].count(vocab.style_placeholder) == 4


def test_rerun_on_the_same_output_dir_does_no_work(run):
    before = _snapshot(run["out"])
    summary = jobs.curate.main(run["argv"])
    assert summary["processed"] == 0 and summary["rows_in"] == 0
    assert summary["written"] == summary["tokens_written"] == summary["masks_written"] == 0
    assert summary["totals"] == run["summary"]["totals"]
    assert _snapshot(run["out"]) == before


def test_rerun_after_a_crash_redoes_only_the_missing_rows(run, tmp_path):
    out = tmp_path / "run" / "curate"
    shutil.copytree(run["out"], out)
    # The crash: one curated file never got renamed into place, and left its temporary file behind; the
    # manifest still says running, as the run wrote it at its start (a complete one is skipped on rerun).
    manifest = {**read_manifest(out), "status": "running"}
    write_manifest(out, manifest.pop("format"), **manifest)
    lost = table_files(out / "curated")[0]
    lost_ids = set(pq.read_table(lost, columns=["id"]).column("id").to_pylist())
    lost.rename(lost.with_name(f".{lost.name}.crash.tmp"))
    before = _snapshot(out)

    argv = [a for a in run["argv"] if not a.startswith("output_dir=")] + [f"output_dir={out}"]
    summary = jobs.curate.main(argv)
    assert summary["processed"] == summary["written"] == len(lost_ids)
    assert summary["tokens_written"] == 0  # their tokens were written before the crash
    after = _snapshot(out)
    new_files = set(after) - set(before)
    assert len(new_files) == 1 and all(after[k] == v for k, v in before.items())
    curated = _table({"out": out}, "curated")
    assert sorted(curated.column("id").to_pylist()) == sorted(_table(run, "curated").column("id").to_pylist())


def test_synthetic_inputs_when_no_path_is_given():
    inputs = load_inputs(InputConfig(synthetic_raw=6, synthetic_requests=5, synthetic_styles=3))
    assert len(inputs.raw.ids()) == 6 and inputs.raw.ref.startswith("synthetic")
    requests = inputs.requests.table
    assert requests.num_rows == 5
    assert {"prompt", "style_ref", "style_image", "seed"} <= set(requests.column_names)
    assert set(requests.column("style_ref").to_pylist()) <= set(inputs.references.ids())
    assert len(inputs.references.ids()) == 3


def test_parquet_inputs_are_checked_and_limited(tmp_path):
    rows = SyntheticStyleSet(seed=0, size=64).raw_pairs(5)
    pq.write_table(rows_to_table(rows, RAW_PAIRS_SCHEMA), tmp_path / "raw.parquet")
    inputs = load_inputs(InputConfig(raw_path=str(tmp_path / "raw.parquet"), limit=3))
    assert inputs.raw.ids() == [r["id"] for r in rows[:3]] and inputs.raw.files
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(
        pa.table({"id": ["a"], "text": ["no prompt column"], "image": [b""]}), bad / "part.parquet"
    )
    with pytest.raises(SchemaError, match=r"raw input .*part\.parquet: missing column 'prompt'"):
        load_inputs(InputConfig(raw_path=str(bad)))

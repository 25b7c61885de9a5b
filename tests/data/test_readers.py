"""Raw pair readers: parquet files and dirs, captioned folders (jsonl / csv), corrupt bytes carried."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stylear_core.data.images import ImageDecodeError, decode_image
from stylear_core.data.readers import CaptionFileError, read_caption_folder, read_raw_pairs
from stylear_core.data.schemas import RAW_PAIRS_SCHEMA, SchemaError, rows_to_table, schema_version
from stylear_core.data.synthetic import SyntheticStyleSet, corrupt_bytes


@pytest.fixture()
def pairs():
    return SyntheticStyleSet(seed=1, size=32).raw_pairs(5)


def write_folder(folder, pairs, fmt):
    folder.mkdir()
    entries = []
    for k, row in enumerate(pairs):
        name = f"img/{row['id']}.png"
        (folder / "img").mkdir(exist_ok=True)
        (folder / name).write_bytes(corrupt_bytes("truncated") if k == 1 else row["image"])
        entries.append({"file": name, "prompt": row["prompt"]})
    entries.append({"file": "img/missing.png", "prompt": "a file that is not there"})
    if fmt == "jsonl":
        (folder / "captions.jsonl").write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    else:
        with (folder / "captions.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["file", "prompt"])
            writer.writeheader()
            writer.writerows(entries)
    return entries


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_caption_folder(tmp_path, pairs, fmt):
    write_folder(tmp_path / "raw", pairs, fmt)
    table = read_raw_pairs(tmp_path / "raw")
    assert schema_version(table.schema) == "stylear.raw/1"
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == [f"img/{p['id']}" for p in pairs] + ["img/missing"]
    assert [r["prompt"] for r in rows[:5]] == [p["prompt"] for p in pairs]
    assert rows[0]["image"] == pairs[0]["image"]
    # Unreadable and missing files are carried, not fatal: decoding fails later, where errors are recorded.
    assert rows[1]["image"] == corrupt_bytes("truncated")
    assert rows[-1]["image"] == b""
    with pytest.raises(ImageDecodeError):
        decode_image(rows[1]["image"])
    assert decode_image(rows[2]["image"]).size == (32, 32)


def test_caption_folder_limit_and_explicit_id(tmp_path, pairs):
    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "x.png").write_bytes(pairs[0]["image"])
    (folder / "captions.jsonl").write_text(
        json.dumps({"file": "x.png", "prompt": "p", "id": "custom"})
        + "\n\n"
        + json.dumps({"file": "x.png", "prompt": "q"})
    )
    assert [r["id"] for r in read_caption_folder(folder)] == ["custom", "x"]
    assert len(read_caption_folder(folder, limit=1)) == 1


def test_bad_caption_files(tmp_path):
    folder = tmp_path / "raw"
    folder.mkdir()
    with pytest.raises(CaptionFileError, match="no captions"):
        read_caption_folder(folder)
    (folder / "captions.jsonl").write_text('{"file": "a.png"}\n')
    with pytest.raises(CaptionFileError, match="captions.jsonl:1"):
        read_caption_folder(folder)
    (folder / "captions.jsonl").unlink()
    (folder / "captions.csv").write_text("path,text\na.png,hello\n")
    with pytest.raises(CaptionFileError, match="header"):
        read_caption_folder(folder)


def test_parquet_file_and_directory(tmp_path, pairs):
    pairs[2]["image"] = corrupt_bytes("random")
    table = rows_to_table(pairs, RAW_PAIRS_SCHEMA)
    pq.write_table(table.slice(0, 3), tmp_path / "part-0.parquet")
    # A second shard as another writer might leave it: large types, an extra column, no metadata.
    loose = pa.table(
        {
            "id": pa.array([p["id"] for p in pairs[3:]], pa.large_string()),
            "prompt": pa.array([p["prompt"] for p in pairs[3:]], pa.large_string()),
            "image": pa.array([p["image"] for p in pairs[3:]], pa.large_binary()),
            "url": pa.array(["u"] * 2),
        }
    )
    pq.write_table(loose, tmp_path / "part-1.parquet")
    whole = read_raw_pairs(tmp_path)
    assert whole.schema.equals(RAW_PAIRS_SCHEMA, check_metadata=True)
    assert whole.to_pylist() == pairs
    assert read_raw_pairs(tmp_path / "part-1.parquet").num_rows == 2
    assert read_raw_pairs(tmp_path, limit=4).column("id").to_pylist() == [p["id"] for p in pairs[:4]]


def test_parquet_missing_column_names_it_and_the_file(tmp_path):
    pq.write_table(pa.table({"id": ["a"], "caption": ["b"], "image": [b"c"]}), tmp_path / "bad.parquet")
    with pytest.raises(SchemaError, match=r"bad\.parquet.*missing column 'prompt'"):
        read_raw_pairs(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_raw_pairs(tmp_path / "nope.parquet")

"""Readers of raw text-image pairs into the ``stylear.raw/1`` format (:data:`RAW_PAIRS_SCHEMA`).

Two sources are understood:

* parquet: one file or a directory of ``*.parquet`` files with at least the raw columns
  ``id``, ``prompt``, ``image`` (binary);
* an image folder with captions, either ``captions.jsonl`` (one ``{"file": ..., "prompt": ...}``
  per line, optional ``"id"``) or ``captions.csv`` (header ``file,prompt``, optional ``id`` column).
  ``file`` is relative to the folder; the id defaults to the file path without its suffix.

Image bytes are carried through undecoded: a corrupt image is not an error here, it becomes one
where it is decoded (and is recorded in the errors table there). A caption whose file is missing
carries empty bytes for the same reason, with a logged warning.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from stylear_core.data.schemas import RAW_PAIRS_SCHEMA, conform_table, rows_to_table

log = logging.getLogger(__name__)

CAPTION_FILES = ("captions.jsonl", "captions.csv")


class CaptionFileError(ValueError):
    """A captions file is malformed (the message names the file and line)."""


def _caption_entries_jsonl(path: Path) -> list[dict[str, Any]]:
    entries = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise CaptionFileError(f"{path}:{lineno}: not JSON: {e}") from None
        if not isinstance(entry, dict) or "file" not in entry or "prompt" not in entry:
            raise CaptionFileError(f"{path}:{lineno}: expected an object with 'file' and 'prompt'")
        entries.append(entry)
    return entries


def _caption_entries_csv(path: Path) -> list[dict[str, Any]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"file", "prompt"} <= set(reader.fieldnames):
            raise CaptionFileError(f"{path}: header must name the columns 'file' and 'prompt'")
        return [dict(row) for row in reader]


def read_caption_folder(folder: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """An image folder with ``captions.jsonl`` or ``captions.csv`` -> raw rows ``{id, prompt, image}``.

    Rows keep the captions file's order; ``limit`` stops after that many rows. Raises
    :class:`CaptionFileError` for a malformed captions file, or when the folder has none.
    """
    folder = Path(folder)
    jsonl, csv_file = (folder / name for name in CAPTION_FILES)
    if jsonl.exists():
        entries = _caption_entries_jsonl(jsonl)
    elif csv_file.exists():
        entries = _caption_entries_csv(csv_file)
    else:
        raise CaptionFileError(f"{folder}: no {' or '.join(CAPTION_FILES)}")
    rows = []
    for entry in entries[:limit] if limit is not None else entries:
        rel = str(entry["file"])
        image_path = folder / rel
        try:
            image = image_path.read_bytes()
        except OSError as e:
            log.warning("raw pair %s: cannot read %s (%s); carrying empty image bytes", rel, image_path, e)
            image = b""
        row_id = entry.get("id") or str(Path(rel).with_suffix(""))
        rows.append({"id": str(row_id), "prompt": str(entry["prompt"]), "image": image})
    return rows


def _parquet_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
        if not files:
            raise FileNotFoundError(f"{path}: no .parquet files")
        return files
    if not path.exists():
        raise FileNotFoundError(path)
    return [path]


def read_parquet_pairs(path: str | Path, limit: int | None = None) -> pa.Table:
    """A parquet file, or a directory of them (sorted by path), -> a ``stylear.raw/1`` table.

    Extra columns are dropped and compatible types cast (e.g. large_string); a missing or mistyped
    raw column raises :class:`~stylear_core.data.schemas.SchemaError` naming it and the file.
    """
    tables = []
    remaining = limit
    for file in _parquet_files(Path(path)):
        table = pq.read_table(file, columns=None)
        try:
            table = conform_table(table, RAW_PAIRS_SCHEMA)
        except ValueError as e:
            raise type(e)(f"{file}: {e}") from None
        if remaining is not None:
            table = table.slice(0, remaining)
            remaining -= table.num_rows
        tables.append(table)
        if remaining is not None and remaining <= 0:
            break
    return pa.concat_tables(tables) if tables else RAW_PAIRS_SCHEMA.empty_table()


def read_raw_pairs(path: str | Path, limit: int | None = None) -> pa.Table:
    """Raw pairs from a parquet file / directory or a captioned image folder -> ``stylear.raw/1`` table.

    A directory holding ``captions.jsonl`` / ``captions.csv`` is read as an image folder, any other
    path as parquet. ``table.to_pylist()`` gives the rows as dicts.
    """
    path = Path(path)
    if path.is_dir() and any((path / name).exists() for name in CAPTION_FILES):
        return rows_to_table(read_caption_folder(path, limit=limit), RAW_PAIRS_SCHEMA)
    return read_parquet_pairs(path, limit=limit)

"""The curation job's inputs: raw pairs, stylization requests and style references (synthetic when unset).

:func:`load_inputs` gives a :class:`CurationInputs` of three :class:`~stylear_core.data.passes.InputTable`:
parquet inputs stay on disk (only their schemas and ids are read here), a captioned image folder is read
whole, and with no paths set all three come from :class:`~stylear_core.data.synthetic.SyntheticStyleSet`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from stylear_core.curation.config import InputConfig
from stylear_core.data.passes import InputTable
from stylear_core.data.schemas import (
    RAW_PAIRS_SCHEMA,
    SchemaError,
    rows_to_table,
    validate_table,
)


@dataclass
class CurationInputs:
    """The three inputs of a curation run."""

    raw: InputTable
    requests: InputTable
    references: InputTable


# Columns a parquet input must have, by input (optional ones: requests' style_ref and seed).
REQUIRED_COLUMNS: dict[str, dict[str, pa.DataType]] = {
    "raw": {"id": pa.string(), "prompt": pa.string(), "image": pa.binary()},
    "requests": {"id": pa.string(), "prompt": pa.string(), "style_image": pa.binary()},
    "references": {"id": pa.string(), "image": pa.binary()},
}


def _parquet_input(name: str, path: str, limit: int | None) -> InputTable:
    """A parquet file or directory as an input, after checking every file has the input's columns."""
    p = Path(path)
    files = (
        sorted(str(f) for f in p.rglob("*.parquet") if not f.name.startswith((".", "_")))
        if p.is_dir()
        else [str(p)]
    )
    if not files or not all(Path(f).is_file() for f in files):
        raise FileNotFoundError(f"{name} input {path}: no parquet files")
    required = pa.schema([pa.field(n, t) for n, t in REQUIRED_COLUMNS[name].items()])
    for f in files:
        try:
            validate_table(pq.read_schema(f).empty_table(), required)
        except SchemaError as e:
            raise SchemaError(f"{name} input {f}: {e}") from None
    return InputTable(name, ref=str(p), files=files, limit=limit)


def _requests_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    return pa.table(
        {
            "id": pa.array([r["id"] for r in rows], pa.string()),
            "prompt": pa.array([r["prompt"] for r in rows], pa.string()),
            "style_ref": pa.array([r.get("style_ref") for r in rows], pa.string()),
            "style_image": pa.array([r["style_image"] for r in rows], pa.binary()),
            "seed": pa.array([r.get("seed") for r in rows], pa.int64()),
        }
    )


def _references_from_requests(requests: InputTable) -> pa.Table:
    """The first ``style_image`` of each ``style_ref`` of the requests, as ``{id, image}``, file by file."""
    firsts: dict[str, bytes] = {}
    sources = [requests.table] if requests.table is not None else [pq.ParquetFile(f) for f in requests.files]
    for source in sources:
        batches = (
            source.to_batches()
            if isinstance(source, pa.Table)
            else source.iter_batches(columns=["style_ref", "style_image"])
        )
        for batch in batches:
            for ref, image in zip(
                batch.column("style_ref").to_pylist(), batch.column("style_image").to_pylist()
            ):
                if ref is not None and ref not in firsts:
                    firsts[ref] = image or b""
    return pa.table(
        {"id": pa.array(list(firsts), pa.string()), "image": pa.array(list(firsts.values()), pa.binary())}
    )


def load_inputs(cfg: InputConfig, stylize: bool = True) -> CurationInputs:
    """The raw pairs, requests and references ``cfg`` names (synthetic ones for empty paths).

    A captioned image folder is read with :func:`~stylear_core.data.readers.read_raw_pairs`; parquet
    inputs stay on disk (only their schemas and ids are read here) and a missing or mistyped column
    is a :class:`~stylear_core.data.schemas.SchemaError` naming the file. With no references path,
    the references are the first ``style_image`` of each ``style_ref`` of the requests.
    ``stylize=False`` (raw pairs only) gives no requests, not even synthetic ones, and references
    only from ``cfg.references_path``.
    """
    from stylear_core.data.readers import CAPTION_FILES, read_raw_pairs
    from stylear_core.data.synthetic import SyntheticStyleSet

    limit = cfg.limit or None
    data = SyntheticStyleSet(seed=cfg.synthetic_seed, size=cfg.synthetic_size)
    synthetic_ref = f"synthetic(seed={cfg.synthetic_seed}, size={cfg.synthetic_size})"

    if not cfg.raw_path:
        raw = InputTable(
            "raw", synthetic_ref, rows_to_table(data.raw_pairs(cfg.synthetic_raw), RAW_PAIRS_SCHEMA)
        )
    elif Path(cfg.raw_path).is_dir() and any((Path(cfg.raw_path) / n).exists() for n in CAPTION_FILES):
        raw = InputTable("raw", cfg.raw_path, read_raw_pairs(cfg.raw_path, limit=limit))
    else:
        raw = _parquet_input("raw", cfg.raw_path, limit)

    if not stylize:
        requests = InputTable("requests", "none (stylize: false)", _requests_table([]))
    elif cfg.requests_path:
        requests = _parquet_input("requests", cfg.requests_path, limit)
    else:
        requests = InputTable(
            "requests",
            synthetic_ref,
            _requests_table(data.stylization_requests(cfg.synthetic_requests, cfg.synthetic_styles)),
        )

    if cfg.references_path:
        references = _parquet_input("references", cfg.references_path, limit)
    elif not stylize:
        references = InputTable("references", "none (stylize: false)", _references_from_requests(requests))
    elif not cfg.requests_path:
        refs = data.style_references(cfg.synthetic_styles)
        references = InputTable(
            "references",
            synthetic_ref,
            pa.table(
                {"id": pa.array(list(refs), pa.string()), "image": pa.array(list(refs.values()), pa.binary())}
            ),
        )
    else:
        references = InputTable("references", cfg.requests_path, _references_from_requests(requests))

    if limit:
        for source in (raw, requests, references):
            if source.table is not None:
                source.table = source.table.slice(0, limit)
    return CurationInputs(raw=raw, requests=requests, references=references)


def unique_ids(ids: Sequence[str]) -> tuple[list[str], dict[str, int]]:
    """``ids`` without the ids that occur more than once, and those ids with their counts."""
    counts = Counter(ids)
    duplicates = {i: c for i, c in counts.items() if c > 1}
    return [i for i in ids if i not in duplicates], duplicates


__all__ = ["REQUIRED_COLUMNS", "CurationInputs", "load_inputs", "unique_ids"]

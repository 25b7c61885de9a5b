"""The parts of the curation pipeline that run inside Ray Data workers, and the output tables they write.

Every write task's worker imports this module, so it stays light: pyarrow, numpy and Ray only at
import time; torch and the models are imported by the actors' constructors and the row functions
when they first run.

* Output tables: ``output_dir/<name>/*.parquet`` for each name of :data:`TABLE_SCHEMAS`, written by
  :func:`write_table_atomic` (a hidden temporary file, then an atomic rename: a file is complete or
  absent) and read back by :func:`read_table` / :func:`written_ids` / :func:`error_ids`, which skip
  hidden and temporary files.
* The error-row convention: a UDF marks a row it could not use with ``error`` (the reason) and
  ``error_stage`` (the stage that failed it); :class:`RoutedParquetSink` sends those rows to the
  ``errors`` table and the others to the pass's table.
* Row functions and actor wrappers: :func:`normalize_raw_batch`, :func:`mark_error_stage`,
  :class:`StylizeActor`, :class:`MaskActor`.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor

from stylear_core.data.schemas import (
    CURATED_SCHEMA,
    ERRORS_SCHEMA,
    SAM_MASKS_SCHEMA,
    STYLE_REQUESTS_SCHEMA,
    TOKEN_SHARDS_SCHEMA,
    conform_table,
    rows_to_table,
)

TABLE_SCHEMAS: dict[str, pa.Schema] = {
    "stylized": CURATED_SCHEMA,
    "curated": CURATED_SCHEMA,
    "masks": SAM_MASKS_SCHEMA,
    "tokens": TOKEN_SHARDS_SCHEMA,
    "preference_requests": STYLE_REQUESTS_SCHEMA,
    "errors": ERRORS_SCHEMA,
}
"""Every table of a curation output directory (``output_dir/<name>/*.parquet``) and its schema."""


# ---------------------------------------------------------------------------------------------
# Output tables: atomic files, id read-back, the routed sink


def table_dir(output_dir: str | Path, name: str) -> Path:
    """``output_dir/<name>`` for a table of :data:`TABLE_SCHEMAS`."""
    if name not in TABLE_SCHEMAS:
        raise KeyError(f"unknown table {name!r} (known: {', '.join(TABLE_SCHEMAS)})")
    return Path(output_dir) / name


def table_files(directory: str | Path) -> list[Path]:
    """The complete parquet files of a table directory, sorted (hidden / temporary files are skipped)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(
        p
        for p in directory.iterdir()
        if p.suffix == ".parquet" and not p.name.startswith((".", "_")) and p.is_file()
    )


def read_table(directory: str | Path, columns: Sequence[str] | None = None) -> pa.Table | None:
    """The complete files of a table directory as one table (only ``columns`` when given), or None if none."""
    files = table_files(directory)
    if not files:
        return None
    return pads.dataset([str(f) for f in files], format="parquet").to_table(
        columns=list(columns) if columns else None
    )


def written_ids(directory: str | Path) -> set[str]:
    """Ids in a table directory's complete files."""
    table = read_table(directory, ["id"])
    return set(table.column("id").to_pylist()) if table is not None else set()


def error_ids(output_dir: str | Path, stages: Iterable[str]) -> set[str]:
    """Ids recorded in ``errors/`` for any of ``stages``."""
    table = read_table(table_dir(output_dir, "errors"), ["id", "stage"])
    if table is None:
        return set()
    mask = pc.is_in(table.column("stage"), value_set=pa.array(list(stages), pa.string()))
    return set(table.filter(mask).column("id").to_pylist())


def write_table_atomic(table: pa.Table, directory: str | Path, name: str) -> Path:
    """Write ``table`` to ``directory/name`` through a hidden temporary file and a rename (complete or absent)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / name
    tmp = directory / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, final)
    return final


def error_rows_table(
    ids: Sequence[str], stages: Sequence[str], reasons: Sequence[str], input_ref: str
) -> pa.Table:
    """An ``errors`` table from parallel lists."""
    return rows_to_table(
        [{"id": i, "stage": s, "reason": r, "input_ref": input_ref} for i, s, r in zip(ids, stages, reasons)],
        ERRORS_SCHEMA,
    )


def _block_table(block: Block) -> pa.Table:
    return BlockAccessor.for_block(block).to_arrow()


class RoutedParquetSink(Datasink):
    """Ray Data sink that writes a pass's good rows to its table and its failed rows to ``errors/``.

    Takes the output ``directory`` of the good rows and their ``schema``, the ``errors_dir``, the
    ``default_stage`` of error rows that carry no ``error_stage`` and an ``input_ref`` (where the
    input came from) for the errors table. A row is failed when its ``error`` column is set. Each
    write task writes at most one file per table, named ``<pass id>-<task>.parquet``, through a hidden
    temporary name and a rename, so a file is either complete or absent (see the module docstring).
    After the write, ``rows_written`` and ``errors_by_stage`` hold the totals.
    """

    def __init__(
        self,
        directory: str | Path,
        schema: pa.Schema,
        errors_dir: str | Path,
        default_stage: str,
        input_ref: str,
        min_rows_per_file: int = 1024,
    ) -> None:
        self.directory = str(directory)
        self.schema = schema
        self.errors_dir = str(errors_dir)
        self.default_stage = default_stage
        self.input_ref = input_ref
        self.min_rows_per_file = min_rows_per_file
        self.pass_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self.rows_written = 0
        self.errors_by_stage: Counter[str] = Counter()

    def on_write_start(self, schema: pa.Schema | None = None) -> None:
        """Create the two directories."""
        Path(self.directory).mkdir(parents=True, exist_ok=True)
        Path(self.errors_dir).mkdir(parents=True, exist_ok=True)

    @property
    def min_rows_per_write(self) -> int:
        return self.min_rows_per_file

    def split(self, table: pa.Table) -> tuple[pa.Table, pa.Table]:
        """``table`` -> (good rows conformed to ``schema``, failed rows as an ``errors`` table).

        A nullable column of the schema that the rows lack (e.g. an input without seeds) is added as nulls.
        """
        for f in self.schema:
            if f.nullable and f.name not in table.column_names:
                table = table.append_column(f.name, pa.nulls(table.num_rows, f.type))
        if "error" in table.column_names and table.num_rows:
            failed = pc.invert(pc.is_null(table.column("error")))
            failed = pc.fill_null(failed, False)
        else:
            failed = pa.array(np.zeros(table.num_rows, dtype=bool))
        good = conform_table(table.filter(pc.invert(failed)), self.schema)
        bad = table.filter(failed)
        if "error_stage" in bad.column_names:
            stages = [s or self.default_stage for s in bad.column("error_stage").to_pylist()]
        else:
            stages = [self.default_stage] * bad.num_rows
        errors = error_rows_table(
            [str(i) for i in bad.column("id").to_pylist()],
            stages,
            [str(r) for r in bad.column("error").to_pylist()] if bad.num_rows else [],
            self.input_ref,
        )
        return good, errors

    def write(self, blocks: Iterable[Block], ctx: Any) -> dict[str, Any]:
        """Write one task's blocks; returns ``{"rows": good rows, "errors": {stage: rows}}``."""
        tables = [_block_table(b) for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return {"rows": 0, "errors": {}}
        good, errors = self.split(pa.concat_tables(tables, promote_options="permissive"))
        name = f"{self.pass_id}-{ctx.task_idx:05d}.parquet"
        if good.num_rows:
            write_table_atomic(good, self.directory, name)
        if errors.num_rows:
            write_table_atomic(errors, self.errors_dir, name)
        return {"rows": good.num_rows, "errors": dict(Counter(errors.column("stage").to_pylist()))}

    def on_write_complete(self, write_result: Any) -> None:
        """Add up the write tasks' counts."""
        for result in write_result.write_returns:
            self.rows_written += result["rows"]
            self.errors_by_stage.update(result["errors"])


# ---------------------------------------------------------------------------------------------
# Row functions and actor wrappers (run inside Ray Data tasks / actors)


Batch = pa.Table | Mapping[str, Any]
"""A Ray Data batch as a UDF receives it: a pyarrow table, or a dict of numpy arrays (or lists)."""


def batch_columns(batch: Batch) -> list[str]:
    """The column names of a batch."""
    return batch.column_names if isinstance(batch, pa.Table) else list(batch)


def batch_values(batch: Batch, name: str, n: int) -> list[Any]:
    """Column ``name`` of a batch as Python values (``n`` Nones when the batch has no such column)."""
    if name not in batch_columns(batch):
        return [None] * n
    values = batch[name]
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values.to_pylist()
    return values.tolist() if isinstance(values, np.ndarray) else list(values)


def batch_to_table(batch: Batch) -> pa.Table:
    """A batch as a pyarrow table (a table is returned as is, so its column types are kept)."""
    if isinstance(batch, pa.Table):
        return batch
    return pa.table({k: (v.tolist() if isinstance(v, np.ndarray) else list(v)) for k, v in batch.items()})


def normalize_raw_batch(batch: Batch, max_pixels: int = 64_000_000) -> pa.Table:
    """Raw pairs ``{id, prompt, image}`` -> curated columns (PNG image, size, ``source = "raw"``) or an error.

    A row whose image does not decode, or whose prompt is empty, gets ``error`` and
    ``error_stage = "decode"``.
    """
    from stylear_core.data.images import ImageDecodeError, decode_image, encode_png

    ids = [str(i) for i in batch_values(batch, "id", len(batch["id"]))]
    n = len(ids)
    prompts = batch_values(batch, "prompt", n)
    images = batch_values(batch, "image", n)
    out_images: list[bytes | None] = [None] * n
    widths: list[int | None] = [None] * n
    heights: list[int | None] = [None] * n
    errors: list[str | None] = [None] * n
    for k in range(n):
        try:
            if not isinstance(prompts[k], str) or not prompts[k].strip():
                raise ValueError("empty prompt")
            img = decode_image(bytes(images[k] or b""), max_pixels=max_pixels)
        except (ImageDecodeError, ValueError) as e:
            errors[k] = str(e)
            continue
        out_images[k] = encode_png(img)
        widths[k], heights[k] = img.size
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "prompt": pa.array([p if isinstance(p, str) else "" for p in prompts], pa.string()),
            "image": pa.array(out_images, pa.binary()),
            "source": pa.array(["raw"] * n, pa.string()),
            "style_ref": pa.nulls(n, pa.string()),
            "clip_text_score": pa.nulls(n, pa.float32()),
            "width": pa.array(widths, pa.int32()),
            "height": pa.array(heights, pa.int32()),
            "seed": pa.nulls(n, pa.int64()),
            "error": pa.array(errors, pa.string()),
            "error_stage": pa.array([None if e is None else "decode" for e in errors], pa.string()),
        }
    )


def mark_error_stage(batch: Batch, stage: str) -> pa.Table:
    """The batch as a table, with ``error_stage = stage`` on its failed rows that have none yet."""
    table = batch_to_table(batch)
    n = table.num_rows
    errors = batch_values(table, "error", n)
    stages = batch_values(table, "error_stage", n)
    marked = pa.array(
        [s if s is not None or e is None else stage for e, s in zip(errors, stages)], pa.string()
    )
    if "error_stage" in table.column_names:
        return table.set_column(table.column_names.index("error_stage"), "error_stage", marked)
    return table.append_column("error_stage", marked)


class StylizeActor:
    """Ray Data actor: the :class:`~stylear_core.curation.stylizer.Stylizer` of ``cfg`` with failed rows tagged ``stylize``."""

    def __init__(self, cfg: Any) -> None:
        from stylear_core.curation.stylizer import Stylizer

        self.stylizer = Stylizer(cfg)

    def __call__(self, batch: Batch) -> pa.Table:
        """Stylize a batch of requests (see :class:`Stylizer`)."""
        return mark_error_stage(self.stylizer(batch), "stylize")


class MaskActor:
    """Ray Data actor: :class:`~stylear_core.curation.sam.StyleRegionMasker` built from ``cfg`` (a ``MaskerConfig``) in the worker."""

    def __init__(self, cfg: Any) -> None:
        from stylear_core.curation.sam import StyleRegionMasker

        self.masker = StyleRegionMasker.from_config(cfg)

    def __call__(self, batch: Batch) -> pa.Table:
        """Mask a batch of references ``{id, image}`` (see :class:`StyleRegionMasker`)."""
        return mark_error_stage(self.masker(batch), "sam")

"""Ray Data batches as Python values: the one way every batch UDF reads its columns.

A UDF of ``map_batches`` receives a batch as a pyarrow table (``batch_format="pyarrow"``) or as a dict
of numpy arrays (the default); a column may also be a plain list when a caller builds the batch by
hand. These helpers give the same Python values for all three. This module imports pyarrow and numpy
only (no Ray, no torch), so model-side modules that Ray workers import stay light.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

Batch = pa.Table | Mapping[str, Any]
"""A Ray Data batch as a UDF receives it: a pyarrow table, or a dict of numpy arrays (or lists)."""


def column_values(values: Any) -> list[Any]:
    """A batch column (pyarrow array, numpy array or sequence) as a list of Python values."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values.to_pylist()
    return values.tolist() if isinstance(values, np.ndarray) else list(values)


def batch_columns(batch: Batch) -> list[str]:
    """The column names of a batch."""
    return batch.column_names if isinstance(batch, pa.Table) else list(batch)


def batch_num_rows(batch: Batch) -> int:
    """The number of rows of a batch (a dict batch is measured by its ``id`` column)."""
    return batch.num_rows if isinstance(batch, pa.Table) else len(batch["id"])


def batch_values(batch: Batch, name: str, n: int) -> list[Any]:
    """Column ``name`` of a batch as Python values (``n`` Nones when the batch has no such column)."""
    if name not in batch_columns(batch):
        return [None] * n
    return column_values(batch[name])


def batch_to_table(batch: Batch) -> pa.Table:
    """A batch as a pyarrow table (a table is returned as is, so its column types are kept)."""
    if isinstance(batch, pa.Table):
        return batch
    return pa.table({k: column_values(v) for k, v in batch.items()})


def table_to_numpy_batch(table: pa.Table, columns: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """A pyarrow table as Ray Data's numpy batch format hands it to a UDF: one object array per column
    (``columns``, default all), list cells as numpy arrays."""
    out = {}
    for name in table.column_names if columns is None else columns:
        values = table.column(name).to_pylist()
        column = np.empty(len(values), dtype=object)
        column[:] = [np.asarray(v) if isinstance(v, list) else v for v in values]
        out[name] = column
    return out


__all__ = [
    "Batch",
    "batch_columns",
    "batch_num_rows",
    "batch_to_table",
    "batch_values",
    "column_values",
    "table_to_numpy_batch",
]

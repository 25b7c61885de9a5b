"""Ray Data passes that write parquet tables: the kit curation (stage 0) and proxy data (stage 2) share.

A *pass* reads the ids it still has to do from an :class:`InputTable`, maps them through actor
classes on autoscaling actor pools (:func:`map_actors`, sized by :class:`ActorPoolConfig`) and streams
the rows into a :class:`RoutedParquetSink` (:func:`write_pass` gives a :class:`PassResult`).

* Output tables: ``output_dir/<name>/*.parquet``, written by :func:`write_table_atomic` (a hidden
  temporary file, then an atomic rename: a file is complete or absent) and read back by
  :func:`read_table` / :func:`written_ids` / :func:`error_ids`, which skip hidden and temporary files.
  A rerun filters out the ids already written, so it does only the work that is missing.
* The error-row convention: a UDF marks a row it could not use with ``error`` (the reason) and
  ``error_stage`` (the stage that failed it); :class:`RoutedParquetSink` sends those rows to the
  ``errors`` table (:data:`~stylear_core.data.schemas.ERRORS_SCHEMA`) and the others to the pass's table.

Every write task's worker imports this module, so it stays light: pyarrow, numpy and Ray only.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor

from stylear_core.config import ConfigError, Resources, option
from stylear_core.data.schemas import ERRORS_SCHEMA, TABLE_SCHEMAS, conform_table, rows_to_table

log = logging.getLogger(__name__)

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
# Inputs, actor pools, passes


@dataclass
class InputTable:
    """One input of the pipeline: an in-memory arrow table or a list of parquet files, and where it came from."""

    name: str
    ref: str
    table: pa.Table | None = None
    files: list[str] = field(default_factory=list)
    limit: int | None = None
    _ids: list[str] | None = field(default=None, repr=False)

    def ids(self) -> list[str]:
        """Every id (the first ``limit`` when set), in input order; read once."""
        if self._ids is None:
            self._ids = self._read_ids()
        return self._ids

    def _read_ids(self) -> list[str]:
        if self.table is not None:
            column = self.table.column("id")
        elif self.files:
            column = pads.dataset(self.files, format="parquet").to_table(columns=["id"]).column("id")
        else:
            return []
        if self.limit is not None:
            column = column.slice(0, self.limit)
        return [str(i) for i in column.to_pylist()]

    def dataset(
        self,
        ids: Iterable[str],
        rows_per_block: int,
        columns: Sequence[str] | None = None,
        driver_read_bytes: int = 256 * 2**20,
    ):
        """A Ray Dataset of the rows whose id is in ``ids`` (all columns, or ``columns``), in blocks of ``rows_per_block``.

        Parquet files of at most ``driver_read_bytes`` in all are read here and handed to Ray as blocks:
        for small inputs that is much cheaper than a distributed read (whose listing, footer-reading
        actors and read tasks cost seconds per pass); larger inputs are read by Ray Data's
        ``read_parquet`` with the id filter pushed down.
        """
        import ray.data
        from ray.data.expressions import col

        ids = sorted(set(ids))
        if columns and self.files:
            available = set(pq.read_schema(self.files[0]).names)
            columns = [c for c in columns if c in available]
        if self.table is None and sum(Path(f).stat().st_size for f in self.files) > driver_read_bytes:
            ds = ray.data.read_parquet(
                self.files,
                columns=list(columns) if columns else None,
                override_num_blocks=max(1, -(-len(ids) // max(1, rows_per_block))),
            )
            return ds.filter(expr=col("id").is_in(ids))
        keep = pc.field("id").isin(pa.array(ids, pa.string()))
        if self.table is not None:
            table = self.table.filter(keep)
            if columns:
                table = table.select([c for c in columns if c in table.column_names])
        else:
            table = pads.dataset(self.files, format="parquet").to_table(
                columns=list(columns) if columns else None, filter=keep
            )
        step = max(1, rows_per_block)
        return ray.data.from_arrow([table.slice(i, step) for i in range(0, max(table.num_rows, 1), step)])


@dataclass
class ActorPoolConfig:
    """One stage's actor pool and batch size (``ActorPoolStrategy(min_size, max_size)``)."""

    # The per-actor resources were spelled num_gpus / num_cpus; the old keys are still read.
    RENAMED_KEYS: ClassVar[dict] = {"num_gpus": "resources.gpus", "num_cpus": "resources.cpus"}

    min_actors: int = option(1, "actors kept alive for this stage")
    max_actors: int = option(1, "actors the pool may scale up to")
    resources: Resources = option(
        Resources, "CPUs and GPUs of each actor (gpus 0 on CPU; a fraction shares one GPU between actors)"
    )
    batch_size: int = option(8, "rows per call of the actor")

    def validate(self) -> None:
        """Raise :class:`ConfigError` for an empty or inverted pool."""
        if not 1 <= self.min_actors <= self.max_actors:
            raise ConfigError(
                f"actor pool needs 1 <= min_actors <= max_actors, got {self.min_actors}, {self.max_actors}"
            )
        if self.batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {self.batch_size}")


@dataclass
class PassResult:
    """What one pass did: rows sent in, good rows written to its table, error rows by stage, seconds."""

    name: str
    rows_in: int = 0
    rows_written: int = 0
    errors_by_stage: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def map_actors(ds, cls: type, args: tuple, pool: ActorPoolConfig, batch_format: str = "numpy"):
    """``map_batches`` of the actor class ``cls(*args)`` on an autoscaling actor pool of ``pool``'s size.

    ``batch_format="pyarrow"`` for UDFs that read arrow batches: it keeps nullable integer columns
    integers (numpy batches turn an int column with nulls into float).
    """
    import ray.data

    return ds.map_batches(
        cls,
        fn_constructor_args=args,
        compute=ray.data.ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
        **pool.resources.ray_options(),
        batch_size=pool.batch_size,
        batch_format=batch_format,
    )


def write_pass(
    name: str, ds, sink: RoutedParquetSink, rows_in: int, t0: float, kind: str = "curation"
) -> PassResult:
    """Stream ``ds`` into ``sink``; what the pass ``name`` (started at ``t0``, ``rows_in`` rows) did."""
    ds.write_datasink(sink)
    result = PassResult(name, rows_in, sink.rows_written, dict(sink.errors_by_stage), time.time() - t0)
    log.info("%s pass %s: %s", kind, name, result)
    return result


__all__ = [
    "ActorPoolConfig",
    "InputTable",
    "PassResult",
    "RoutedParquetSink",
    "error_ids",
    "error_rows_table",
    "map_actors",
    "read_table",
    "table_dir",
    "table_files",
    "write_pass",
    "write_table_atomic",
    "written_ids",
]

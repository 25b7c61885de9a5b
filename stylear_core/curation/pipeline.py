"""StyleAR data curation as a Ray Data pipeline: stylize, CLIP-filter, mix with raw pairs, SAM masks, tokens.

Inputs (see :class:`InputConfig`): raw text-image pairs, stylization requests (prompt + style
reference image) and the style references themselves; with no paths set, all three come from
:class:`~stylear_core.data.synthetic.SyntheticStyleSet`.

Passes, each a streaming Ray Data execution of class UDFs on actor pools
(``map_batches(Cls, compute=ActorPoolStrategy(min_size, max_size), num_gpus=...)``):

1. **stylize**: requests -> :class:`~stylear_core.curation.stylizer.Stylizer` ->
   :class:`~stylear_core.curation.clip_filter.ClipFilter` -> ``stylized/`` (every stylized pair that
   passed the filter: the expensive GPU output, kept whole so a different mix can reuse it);
2. **masks** (concurrently with 1): style references -> SAM
   (:class:`~stylear_core.curation.sam.StyleRegionMasker`) -> ``masks/``;
3. **curate**: :func:`~stylear_core.curation.mix.mix_raw_and_stylized` picks raw ids for the
   stylized pool at ``mix.ratio``; the picked raw rows are decoded (re-encoded as PNG, CPU tasks)
   and, in the same pass, the picked stylized pairs are copied from ``stylized/``, into
   ``curated/``. A raw row that turns out unreadable is recorded and the pick is redrawn without it
   (the pick ranks ids by a keyed hash, so earlier picks stay picked and the next-ranked id takes its
   place) until every picked raw id is curated;
4. **tokenize**: ``curated/`` -> :class:`~stylear_core.curation.tokenize.TokenizeActor` -> ``tokens/``.

Output directory::

    output_dir/
      stylized/  curated/  masks/  tokens/  errors/   parquet files, schemas of stylear_core.data.schemas
      manifest.json                                  format stylear.curate/1, status, config, summary

**Bad rows** are never fatal and never lost: a row a stage cannot use (unreadable image, failed
generation, CLIP score under the threshold, an input id used twice) leaves its UDF with ``error`` (the
reason) and ``error_stage`` set, and :class:`~stylear_core.curation.stages.RoutedParquetSink` writes
it to ``errors/`` (id, stage, reason, input_ref) instead of the stage's table. Rows under the CLIP
threshold are recorded there too (stage ``clip_filter``), so they are counted and never stylized twice.

**Reruns and crashes.** Every output file is written under a hidden temporary name and renamed into
place when complete (a rename is atomic on POSIX file systems), so a crashed run leaves complete
files plus hidden ``.*.tmp`` debris that every reader here (and pyarrow's dataset discovery, which
skips names starting with ``.`` or ``_``) ignores. Before each pass the ids already in its output
table and in ``errors/`` for its stages are read back and filtered out, so a rerun on the same
output directory does only the work that is missing: a finished run's rerun processes zero rows and
writes no parquet file; a crashed run's rerun redoes only the rows of the files it had not finished.
Tables only grow: a rerun with other inputs or another ratio adds to them and never deletes rows.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from stylear_core.config import ConfigError, option, to_dict
from stylear_core.curation.clip_filter import ClipFilter, ClipFilterConfig
from stylear_core.curation.mix import mix_raw_and_stylized, selection_key
from stylear_core.curation.sam import MaskerConfig
from stylear_core.curation.stages import (
    TABLE_SCHEMAS,
    MaskActor,
    RoutedParquetSink,
    StylizeActor,
    error_ids,
    error_rows_table,
    normalize_raw_batch,
    read_table,
    table_dir,
    table_files,
    write_table_atomic,
    written_ids,
)
from stylear_core.curation.stylizer import StylizerConfig
from stylear_core.curation.tokenize import TokenizeActor, TokenizeConfig
from stylear_core.data.schemas import (
    RAW_PAIRS_SCHEMA,
    SchemaError,
    rows_to_table,
    schema_version,
    validate_table,
)
from stylear_core.models.presets import ModelConfig
from stylear_core.runs import write_manifest

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "stylear.curate/1"

# Error stages whose rows are never retried by the pass that produced them. ``read:<input>`` rows are
# input ids that cannot be used at all (duplicated, or a raw id that also names a request).
STYLIZE_STAGES = ("read:requests", "stylize", "clip_filter")
RAW_STAGES = ("read:raw", "decode")
SAM_STAGES = ("read:references", "sam")
TOKENIZE_STAGES = ("tokenize",)

REQUEST_COLUMNS = ("id", "prompt", "style_ref", "style_image", "seed")


# ---------------------------------------------------------------------------------------------
# Config


@dataclass
class ActorPoolConfig:
    """One stage's actor pool and batch size (``ActorPoolStrategy(min_size, max_size)``)."""

    min_actors: int = option(1, "actors kept alive for this stage")
    max_actors: int = option(1, "actors the pool may scale up to")
    num_gpus: float = option(0.0, "GPUs per actor (0 on CPU; a fraction shares one GPU between actors)")
    num_cpus: float = option(1.0, "CPUs per actor")
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
class InputConfig:
    """Where the raw pairs, the stylization requests and the style references come from."""

    raw_path: str = option(
        "", "raw pairs: parquet file/dir (id, prompt, image) or image folder + captions; '' = synthetic"
    )
    requests_path: str = option(
        "", "stylization requests parquet (id, prompt, style_ref, style_image[, seed]); '' = synthetic"
    )
    references_path: str = option(
        "", "style references parquet (id, image) for SAM; '' = the first style_image of each style_ref"
    )
    limit: int = option(0, "read at most this many rows of each input (0 = all)")
    synthetic_seed: int = option(0, "seed of the synthetic data set")
    synthetic_size: int = option(64, "side of the synthetic images in pixels")
    synthetic_raw: int = option(96, "synthetic raw pairs")
    synthetic_requests: int = option(32, "synthetic stylization requests")
    synthetic_styles: int = option(8, "synthetic styles the requests draw from (= style references)")


@dataclass
class MixConfig:
    """The raw : stylized ratio of the curated set."""

    ratio: float = option(3.0, "raw pairs per stylized pair in curated/ (StyleAR: about 3)")
    seed: int = option(0, "seed of the reproducible selection")
    max_rounds: int = option(8, "redraws of the raw selection after unreadable raw rows are found")


@dataclass
class CurationConfig:
    """The curation job: inputs, models, actor pools and where the tables are written."""

    output_dir: str = option("runs/tiny/curate", "directory of the output tables and manifest")
    run_dir: str = option("runs/tiny", "run directory of the whole pipeline (holds the model cache)")
    cache_dir: str = option("", "where models built for the tiny preset are kept; '' = <run_dir>/.cache")
    ray_address: str = option(
        "auto",
        "Ray cluster: auto (RAY_ADDRESS, else the last `ray start` here), local (private instance) or host:port",
    )
    model: ModelConfig = option(ModelConfig, "VQGAN / tokenizer / vocab (tiny or lumina7b) and image_size")
    inputs: InputConfig = option(InputConfig, "input data")
    stylizer: StylizerConfig = option(
        StylizerConfig, "SDXL + IP-Adapter stylizer (paths empty on tiny: built)"
    )
    clip_filter: ClipFilterConfig = option(ClipFilterConfig, "CLIP prompt-adherence filter")
    sam: MaskerConfig = option(MaskerConfig, "SAM salient-content removal on style references")
    tokenize: TokenizeConfig = option(TokenizeConfig, "VQ tokenization of curated records")
    mix: MixConfig = option(MixConfig, "raw : stylized mixing")
    stylize_pool: ActorPoolConfig = option(ActorPoolConfig(batch_size=4), "stylizer actors")
    clip_pool: ActorPoolConfig = option(ActorPoolConfig(batch_size=32), "CLIP filter actors")
    sam_pool: ActorPoolConfig = option(ActorPoolConfig(batch_size=4), "SAM actors")
    tokenize_pool: ActorPoolConfig = option(ActorPoolConfig(batch_size=32), "tokenizer actors")
    decode_batch_size: int = option(64, "rows per raw-image decode task (CPU tasks, no actors)")
    rows_per_file: int = option(
        1024, "rows gathered into one parquet file (at least; a pass's last file is smaller)"
    )
    driver_read_mb: int = option(
        256,
        "parquet inputs up to this size are read by the driver; larger ones by distributed Ray Data reads",
    )
    preference_fraction: float = option(
        0.0,
        "share of the requests held out of stylization for DPO preference sampling (preference_requests/)",
    )
    progress_bars: bool = option(True, "show Ray Data's progress bars")

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first unusable setting."""
        for name in ("stylize_pool", "clip_pool", "sam_pool", "tokenize_pool"):
            try:
                getattr(self, name).validate()
            except ConfigError as e:
                raise ConfigError(f"{name}: {e}") from None
        if not self.mix.ratio > 0:
            raise ConfigError(f"mix.ratio: must be positive, got {self.mix.ratio}")
        if not 0.0 <= self.preference_fraction < 1.0:
            raise ConfigError(f"preference_fraction: must be in [0, 1), got {self.preference_fraction}")
        for name in ("rows_per_file", "decode_batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")


# ---------------------------------------------------------------------------------------------
# Inputs


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


def load_inputs(cfg: InputConfig) -> CurationInputs:
    """The raw pairs, requests and references ``cfg`` names (synthetic ones for empty paths).

    A captioned image folder is read with :func:`~stylear_core.data.readers.read_raw_pairs`; parquet
    inputs stay on disk (only their schemas and ids are read here) and a missing or mistyped column
    is a :class:`~stylear_core.data.schemas.SchemaError` naming the file. With no references path,
    the references are the first ``style_image`` of each ``style_ref`` of the requests.
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

    if cfg.requests_path:
        requests = _parquet_input("requests", cfg.requests_path, limit)
    else:
        requests = InputTable(
            "requests",
            synthetic_ref,
            _requests_table(data.stylization_requests(cfg.synthetic_requests, cfg.synthetic_styles)),
        )

    if cfg.references_path:
        references = _parquet_input("references", cfg.references_path, limit)
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


# ---------------------------------------------------------------------------------------------
# Passes


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
        num_gpus=pool.num_gpus,
        num_cpus=pool.num_cpus,
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


def _record_read_errors(output_dir: Path, source: InputTable, reasons: Mapping[str, str]) -> int:
    """Write ``{id: reason}`` of unusable ``source`` ids to ``errors/`` (stage ``read:<input>``), once; returns new rows."""
    stage = f"read:{source.name}"
    known = error_ids(output_dir, [stage])
    new = {i: r for i, r in reasons.items() if i not in known}
    if new:
        table = error_rows_table(list(new), [stage] * len(new), list(new.values()), source.ref)
        name = f"read-{source.name}-{uuid.uuid4().hex[:8]}.parquet"
        write_table_atomic(table, table_dir(output_dir, "errors"), name)
    return len(new)


class CurationRun:
    """One run of the curation pipeline over ``cfg`` (see the module docstring); :meth:`run` returns the summary.

    The passes are public so a caller can run them one at a time; each reads back what is already
    written and processes only what is missing.
    """

    def __init__(self, cfg: CurationConfig, inputs: CurationInputs | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.out = Path(cfg.output_dir).resolve()
        self.inputs = inputs or load_inputs(cfg.inputs)
        self.passes: list[PassResult] = []
        self.read_errors: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.raw_in = 0

    def _sink(self, table: str, default_stage: str, input_ref: str) -> RoutedParquetSink:
        return RoutedParquetSink(
            table_dir(self.out, table),
            TABLE_SCHEMAS[table],
            table_dir(self.out, "errors"),
            default_stage,
            input_ref,
            self.cfg.rows_per_file,
        )

    def _dataset(
        self,
        source: InputTable,
        ids: Sequence[str],
        rows_per_block: int,
        columns: Sequence[str] | None = None,
    ):
        return source.dataset(ids, rows_per_block, columns, driver_read_bytes=self.cfg.driver_read_mb * 2**20)

    def _table_input(self, name: str) -> InputTable:
        directory = table_dir(self.out, name)
        return InputTable(name, str(directory), files=[str(f) for f in table_files(directory)])

    def _usable_ids(self, source: InputTable, also_used: set[str] | None = None) -> list[str]:
        """``source``'s ids but the duplicated ones and those in ``also_used``, which are recorded as errors."""
        ids, duplicates = unique_ids(source.ids())
        reasons = {i: f"id occurs {c} times in the {source.name} input" for i, c in duplicates.items()}
        if also_used:
            reasons.update({i: "id also names a stylization request" for i in ids if i in also_used})
        written = _record_read_errors(self.out, source, reasons)
        with self._lock:
            self.read_errors[f"read:{source.name}"] += written
        return [i for i in ids if i not in reasons]

    def _pending(self, source: InputTable, table: str, stages: Sequence[str]) -> list[str]:
        done = written_ids(table_dir(self.out, table)) | error_ids(self.out, stages)
        return [i for i in self._usable_ids(source) if i not in done]

    def stylizer_config(self) -> StylizerConfig:
        """The stylizer config with, on the tiny preset, the paths of a tiny random SDXL built once in the cache."""
        cfg = self.cfg.stylizer
        if cfg.pipeline_path and cfg.ip_adapter_path:
            return cfg
        if self.cfg.model.preset != "tiny":
            raise ValueError(
                "stylizer.pipeline_path and stylizer.ip_adapter_path are required for the lumina7b preset"
            )
        built = tiny_stylizer_dir(self.cache_dir(), seed=self.cfg.model.seed)
        return replace(cfg, pipeline_path=built.pipeline_path, ip_adapter_path=built.ip_adapter_path)

    def cache_dir(self) -> Path:
        """Where models built for the tiny preset are kept."""
        return Path(self.cfg.cache_dir or Path(self.cfg.run_dir) / ".cache").resolve()

    def clip_filter_config(self) -> ClipFilterConfig:
        """The CLIP filter config; an empty checkpoint falls back to ``model.clip_checkpoint`` off the tiny preset."""
        cfg = self.cfg.clip_filter
        if not cfg.checkpoint and cfg.preset != "tiny" and self.cfg.model.clip_checkpoint:
            return replace(cfg, checkpoint=self.cfg.model.clip_checkpoint)
        return cfg

    def held_requests(self) -> set[str]:
        """Request ids held out of stylization for preference sampling (see :func:`preference_hold_out`)."""
        return preference_hold_out(
            self.inputs.requests.ids(), self.cfg.preference_fraction, self.cfg.mix.seed
        )

    def preference_pass(self) -> PassResult:
        """The held-out requests -> ``preference_requests/`` (copied as they are)."""
        t0 = time.time()
        source = self.inputs.requests
        held = self.held_requests()
        todo = [
            i
            for i in source.ids()
            if i in held and i not in written_ids(table_dir(self.out, "preference_requests"))
        ]
        if not todo:
            return PassResult("preference_requests")
        ds = self._dataset(source, todo, self.cfg.rows_per_file, REQUEST_COLUMNS)
        sink = self._sink("preference_requests", "read:requests", source.ref)
        return write_pass("preference_requests", ds, sink, len(todo), t0)

    def stylize_pass(self) -> PassResult:
        """Requests (but the held-out ones) -> Stylizer -> ClipFilter -> ``stylized/`` (+ ``errors/``)."""
        t0 = time.time()
        source = self.inputs.requests
        held = self.held_requests()
        todo = [i for i in self._pending(source, "stylized", STYLIZE_STAGES) if i not in held]
        if not todo:
            return PassResult("stylize")
        pool = self.cfg.stylize_pool
        ds = self._dataset(source, todo, pool.batch_size, REQUEST_COLUMNS)
        ds = map_actors(ds, StylizeActor, (self.stylizer_config(),), pool)
        ds = map_actors(ds, ClipFilter, (self.clip_filter_config(),), self.cfg.clip_pool, "pyarrow")
        return write_pass("stylize", ds, self._sink("stylized", "stylize", source.ref), len(todo), t0)

    def mask_pass(self) -> PassResult:
        """Style references -> SAM -> ``masks/`` (+ ``errors/``)."""
        t0 = time.time()
        source = self.inputs.references
        todo = self._pending(source, "masks", SAM_STAGES)
        if not todo:
            return PassResult("masks")
        pool = self.cfg.sam_pool
        ds = map_actors(
            self._dataset(source, todo, pool.batch_size, ("id", "image")), MaskActor, (self.cfg.sam,), pool
        )
        return write_pass("masks", ds, self._sink("masks", "sam", source.ref), len(todo), t0)

    def curate_pass(self, raw_ids: Sequence[str], stylized_ids: Sequence[str]) -> PassResult:
        """The raw pairs ``raw_ids`` (decoded, re-encoded as PNG) and the stylized pairs ``stylized_ids`` (copied
        from ``stylized/``) -> ``curated/`` (+ ``errors/`` for unreadable raw rows)."""
        t0 = time.time()
        parts = []
        if raw_ids:
            size = self.cfg.decode_batch_size
            ds = self._dataset(self.inputs.raw, raw_ids, size, ("id", "prompt", "image"))
            parts.append(
                ds.map_batches(normalize_raw_batch, batch_size=size, num_cpus=1, batch_format="pyarrow")
            )
        if stylized_ids:
            parts.append(self._dataset(self._table_input("stylized"), stylized_ids, self.cfg.rows_per_file))
        ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        self.raw_in += len(raw_ids)
        sink = self._sink("curated", "decode", self.inputs.raw.ref)
        return write_pass("curate", ds, sink, len(raw_ids) + len(stylized_ids), t0)

    def mix_passes(self) -> dict[str, Any]:
        """Pick raw ids for the stylized pool at the ratio and curate them with the picked stylized pairs,
        redrawing the raw pick around rows found unreadable; returns the selection's sizes.

        In the usual case every stylized pair is picked and is curated in the first round. When raw pairs
        are too few for the ratio, the stylized pick depends on how many raw pairs are readable, so those
        pairs are curated once the raw pick is settled.
        """
        stylized = sorted(written_ids(table_dir(self.out, "stylized")))
        # Curated rows of both kinds share one id space: a raw id that names a request is unusable.
        raw_ids = self._usable_ids(self.inputs.raw, also_used=set(self.inputs.requests.ids()))
        selection = mix_raw_and_stylized([], stylized, self.cfg.mix.ratio, self.cfg.mix.seed)
        for round_index in range(self.cfg.mix.max_rounds + 1):
            bad = error_ids(self.out, RAW_STAGES)
            selection = mix_raw_and_stylized(
                [i for i in raw_ids if i not in bad], stylized, self.cfg.mix.ratio, self.cfg.mix.seed
            )
            done = written_ids(table_dir(self.out, "curated"))
            todo_raw = [i for i in selection.raw_ids if i not in done]
            settled = len(selection.stylized_ids) == len(stylized)
            todo_stylized = [i for i in selection.stylized_ids if i not in done] if settled else []
            if not todo_raw and not todo_stylized:
                break
            if round_index == self.cfg.mix.max_rounds:
                log.warning(
                    "mix: %d picked raw rows still missing after %d rounds", len(todo_raw), round_index
                )
                break
            self.passes.append(self.curate_pass(todo_raw, todo_stylized))
        done = written_ids(table_dir(self.out, "curated"))
        todo_stylized = [i for i in selection.stylized_ids if i not in done]
        if todo_stylized:
            self.passes.append(self.curate_pass([], todo_stylized))
        return {
            "raw_picked": len(selection.raw_ids),
            "stylized_picked": len(selection.stylized_ids),
            "stylized_pool": len(stylized),
        }

    def tokenize_pass(self) -> PassResult:
        """``curated/`` -> TokenizeActor -> ``tokens/`` (+ ``errors/``)."""
        t0 = time.time()
        curated = self._table_input("curated")
        todo = self._pending(curated, "tokens", TOKENIZE_STAGES)
        if not todo:
            return PassResult("tokenize")
        pool = self.cfg.tokenize_pool
        ds = self._dataset(curated, todo, pool.batch_size, ("id", "prompt", "image", "source"))
        ds = map_actors(ds, TokenizeActor, (self.cfg.model, self.cfg.tokenize), pool, "pyarrow")
        return write_pass("tokenize", ds, self._sink("tokens", "tokenize", curated.ref), len(todo), t0)

    def run(self) -> dict[str, Any]:
        """All passes (the masks pass alongside the others), then the manifest; returns the summary."""
        import ray.data

        t0 = time.time()
        ray.data.DataContext.get_current().enable_progress_bars = self.cfg.progress_bars
        write_manifest(self.out, MANIFEST_FORMAT, status="running", config=to_dict(self.cfg))
        # SAM masks depend on nothing else: their pass runs in a second thread (Ray Data executes two
        # datasets at once) while stylize -> mix -> tokenize run in order here.
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            side = pool.submit(lambda: [self.mask_pass(), self.preference_pass()])
            self.passes.append(self.stylize_pass())
            mix = self.mix_passes()
            self.passes.append(self.tokenize_pass())
            self.passes.extend(side.result())
        summary = self.summary(mix, time.time() - t0)
        write_manifest(
            self.out, MANIFEST_FORMAT, status="complete", config=to_dict(self.cfg), summary=summary,
            tables={name: schema_version(schema) for name, schema in TABLE_SCHEMAS.items()},
        )  # fmt: skip
        return summary

    def summary(self, mix: Mapping[str, Any], seconds: float) -> dict[str, Any]:
        """Counts of this run (rows in, stylized, filtered, failed, written, ...) and of the tables after it."""
        by_name: dict[str, PassResult] = {}
        errors: Counter[str] = Counter({k: v for k, v in self.read_errors.items() if v})
        for p in self.passes:
            merged = by_name.setdefault(p.name, PassResult(p.name))
            merged.rows_in += p.rows_in
            merged.rows_written += p.rows_written
            merged.seconds += p.seconds
            errors.update(p.errors_by_stage)

        def count(name: str, attr: str) -> int:
            return getattr(by_name[name], attr) if name in by_name else 0

        totals = {
            name: len(written_ids(table_dir(self.out, name))) for name in TABLE_SCHEMAS if name != "errors"
        }
        err_table = read_table(table_dir(self.out, "errors"), ["id"])
        totals["errors"] = err_table.num_rows if err_table is not None else 0
        curated = read_table(table_dir(self.out, "curated"), ["source"])
        sources = Counter(curated.column("source").to_pylist()) if curated is not None else Counter()
        rows_in = (
            count("stylize", "rows_in")
            + self.raw_in
            + count("masks", "rows_in")
            + count("preference_requests", "rows_in")
        )
        return {
            "rows_in": rows_in,
            "requests_in": count("stylize", "rows_in"),
            "raw_in": self.raw_in,
            "references_in": count("masks", "rows_in"),
            "stylized": count("stylize", "rows_written"),
            "filtered": errors.get("clip_filter", 0),
            "failed": sum(v for k, v in errors.items() if k != "clip_filter"),
            "written": count("curate", "rows_written"),
            "masks_written": count("masks", "rows_written"),
            "preference_requests_written": count("preference_requests", "rows_written"),
            "tokens_written": count("tokenize", "rows_written"),
            "processed": sum(p.rows_in for p in self.passes),
            "errors_by_stage": dict(errors),
            "mix": {
                **mix,
                "curated_raw": sources.get("raw", 0),
                "curated_stylized": sources.get("stylized", 0),
                "ratio": sources["raw"] / sources["stylized"] if sources.get("stylized") else None,
                "target_ratio": self.cfg.mix.ratio,
            },
            "totals": totals,
            "seconds": round(seconds, 2),
            "pass_seconds": {name: round(p.seconds, 2) for name, p in by_name.items()},
        }


def preference_hold_out(ids: Iterable[str], fraction: float, seed: int = 0) -> set[str]:
    """The ids held out for preference sampling: those whose keyed hash falls in the lowest ``fraction``.

    Decided per id (no id set needed), so the same request is held out in every run and on every worker.
    """
    if fraction <= 0:
        return set()
    return {i for i in ids if selection_key(f"preference/{i}", seed) < fraction * 2**64}


def tiny_stylizer_dir(cache_dir: str | Path, seed: int = 0) -> StylizerConfig:
    """The tiny random SDXL + IP-Adapter under ``cache_dir``, built on first use (into a temporary dir, then renamed).

    Returns a config whose paths point at it; later calls (and concurrent builders) reuse the first complete build.
    """
    from stylear_core.curation.stylizer import build_tiny_sdxl_stylizer_dir

    root = Path(cache_dir) / f"tiny_sdxl_stylizer_seed{seed}"
    paths = {"pipeline_path": str(root / "sdxl"), "ip_adapter_path": str(root / "ip_adapter")}
    if not (root / "sdxl" / "model_index.json").is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = root.parent / f".{root.name}.{uuid.uuid4().hex[:8]}.tmp"
        build_tiny_sdxl_stylizer_dir(tmp, seed=seed)
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished first: keep its build
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return replace(StylizerConfig(), **paths)


def run_curation(cfg: CurationConfig, inputs: CurationInputs | None = None) -> dict[str, Any]:
    """Run the curation pipeline of ``cfg`` on the current Ray cluster (``ray.init`` first); returns the summary."""
    return CurationRun(cfg, inputs).run()


def summary_lines(summary: Mapping[str, Any]) -> list[str]:
    """A human-readable rendering of :meth:`CurationRun.summary`."""
    mix = summary["mix"]
    ratio = f"{mix['ratio']:.3f}" if mix["ratio"] is not None else "n/a"
    return [
        f"rows in {summary['rows_in']} (requests {summary['requests_in']}, raw {summary['raw_in']}, "
        f"references {summary['references_in']}, held for preferences {summary['preference_requests_written']})",
        f"stylized {summary['stylized']}, filtered {summary['filtered']}, failed {summary['failed']} "
        f"{summary['errors_by_stage']}",
        f"written: curated {summary['written']}, masks {summary['masks_written']}, tokens {summary['tokens_written']}",
        f"curated raw:stylized = {mix['curated_raw']}:{mix['curated_stylized']} = {ratio} (target {mix['target_ratio']})",
        f"totals {summary['totals']} in {summary['seconds']}s (passes: {summary['pass_seconds']})",
    ]


__all__ = [
    "ActorPoolConfig",
    "CurationConfig",
    "CurationInputs",
    "CurationRun",
    "InputConfig",
    "InputTable",
    "MaskActor",
    "MixConfig",
    "PassResult",
    "map_actors",
    "write_pass",
    "RoutedParquetSink",
    "StylizeActor",
    "TABLE_SCHEMAS",
    "error_ids",
    "load_inputs",
    "normalize_raw_batch",
    "read_table",
    "run_curation",
    "summary_lines",
    "table_dir",
    "table_files",
    "tiny_stylizer_dir",
    "written_ids",
]

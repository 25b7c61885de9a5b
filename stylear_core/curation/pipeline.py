"""StyleAR data curation as a Ray Data pipeline: stylize, CLIP-filter, mix with raw pairs, SAM masks, tokens.

Configuration in :mod:`stylear_core.curation.config`, inputs in
:mod:`stylear_core.curation.inputs` (see :class:`~stylear_core.curation.config.InputConfig`): raw text-image pairs, stylization requests (prompt + style
reference image) and the style references themselves; with no paths set, all three come from
:class:`~stylear_core.data.synthetic.SyntheticStyleSet`.

Passes, each a streaming Ray Data execution of class UDFs on actor pools
(``map_batches(Cls, compute=ActorPoolStrategy(min_size, max_size), num_gpus=...)``), fed blocks of
several batches each (:func:`block_rows`):

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
   place) until every picked raw id is curated. Raw pairs alone (``stylize: false``, or no request to
   stylize) are curated whole; requests that all failed or were filtered stop the run with
   :class:`NoStylizedPairsError` before anything is curated;
4. **tokenize**: ``curated/`` -> :class:`~stylear_core.curation.tokenize.TokenizeActor` -> ``tokens/``
   (prompt ids, image tokens and the working-size image the tokens encode).

Output directory::

    output_dir/
      stylized/  curated/  masks/  tokens/  errors/   parquet files, schemas of stylear_core.data.schemas
      manifest.json                                  format stylear.curate/1, status, config, summary

**Bad rows** are never fatal and never lost: a row a stage cannot use (unreadable image, failed
generation, CLIP score under the threshold, an input id used twice) leaves its UDF with ``error`` (the
reason) and ``error_stage`` set, and :class:`~stylear_core.data.passes.RoutedParquetSink` writes
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
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from stylear_core.config import to_dict
from stylear_core.curation.clip_filter import ClipFilter, ClipFilterConfig
from stylear_core.curation.config import CurationConfig
from stylear_core.curation.inputs import CurationInputs, load_inputs, unique_ids
from stylear_core.curation.mix import mix_raw_and_stylized, selection_key
from stylear_core.curation.stages import MaskActor, StylizeActor, normalize_raw_batch
from stylear_core.curation.stylizer import StylizerConfig
from stylear_core.curation.tokenize import TokenizeActor, TokenizeConfig
from stylear_core.data.passes import (
    ActorPoolConfig,
    InputTable,
    PassResult,
    RoutedParquetSink,
    error_ids,
    error_rows_table,
    map_actors,
    read_table,
    table_dir,
    table_files,
    write_pass,
    write_table_atomic,
    written_ids,
)
from stylear_core.data.schemas import (
    TABLE_SCHEMAS,
    schema_version,
)
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


def block_rows(pool: ActorPoolConfig, rows: int, max_rows: int, blocks_per_actor: int = 4) -> int:
    """Rows per input block of a pass of ``rows`` rows on ``pool``: whole batches, at most ``max_rows``,
    and small enough to leave at least ``blocks_per_actor`` blocks for each actor the pool may grow to.

    Each block is one Ray Data task: one object, one scheduling round trip, one hand-off to the next
    stage. Blocks of a single batch paid that per batch, a cost the bare loop does not have; the
    actor still sees ``batch_size`` rows per call.
    """
    per_actor = -(-rows // (blocks_per_actor * pool.max_actors))
    batches = min(max_rows // pool.batch_size, per_actor // pool.batch_size)
    return pool.batch_size * max(1, batches)


class NoStylizedPairsError(RuntimeError):
    """Stylization was asked for (requests to stylize were given) but made no stylized pair.

    Raised before anything is curated: the mix would otherwise hold raw pairs only, which is what
    ``stylize: false`` asks for explicitly. The message counts the requests by the stage that dropped them.
    """


# ---------------------------------------------------------------------------------------------
# Passes


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
        self.inputs = inputs or load_inputs(cfg.inputs, stylize=cfg.stylize)
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

    def _block_rows(self, pool: ActorPoolConfig, rows: int) -> int:
        return block_rows(pool, rows, self.cfg.rows_per_file)

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
        from stylear_core.testing.tiny_pipelines import tiny_stylizer_dir

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
        if not self.cfg.stylize:
            return PassResult("stylize")
        held = self.held_requests()
        todo = [i for i in self._pending(source, "stylized", STYLIZE_STAGES) if i not in held]
        if not todo:
            return PassResult("stylize")
        pool = self.cfg.stylize_pool
        ds = self._dataset(source, todo, self._block_rows(pool, len(todo)), REQUEST_COLUMNS)
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
            self._dataset(source, todo, self._block_rows(pool, len(todo)), ("id", "image")),
            MaskActor,
            (self.cfg.sam,),
            pool,
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
        if not stylized:
            self._check_stylization_made_something()
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

    def _check_stylization_made_something(self) -> None:
        """Raise :class:`NoStylizedPairsError` when requests were to be stylized and ``stylized/`` is empty."""
        if not self.cfg.stylize:
            return
        held = self.held_requests()
        asked = {i for i in self.inputs.requests.ids() if i not in held}
        if not asked:
            return  # nothing to stylize: the raw pairs are the whole data set
        errors = read_table(table_dir(self.out, "errors"), ["id", "stage"])
        dropped: Counter[str] = Counter()
        if errors is not None:
            for i, stage in zip(errors.column("id").to_pylist(), errors.column("stage").to_pylist()):
                if i in asked and stage in STYLIZE_STAGES:
                    dropped[stage] += 1
        reasons = ", ".join(f"{stage}: {n}" for stage, n in sorted(dropped.items())) or "none recorded"
        raise NoStylizedPairsError(
            f"{len(asked)} stylization request(s) were given but no stylized pair was made (dropped by "
            f"stage: {reasons}; see {table_dir(self.out, 'errors')}), so a raw : stylized mix at ratio "
            f"{self.cfg.mix.ratio} cannot be curated. Fix the stylizer or clip_filter.threshold and curate "
            "into a new output_dir (dropped requests are not retried), or set stylize=false to curate "
            "the raw pairs alone."
        )

    def tokenize_pass(self) -> PassResult:
        """``curated/`` -> TokenizeActor -> ``tokens/`` (+ ``errors/``)."""
        t0 = time.time()
        curated = self._table_input("curated")
        todo = self._pending(curated, "tokens", TOKENIZE_STAGES)
        if not todo:
            return PassResult("tokenize")
        pool = self.cfg.tokenize_pool
        ds = self._dataset(
            curated, todo, self._block_rows(pool, len(todo)), ("id", "prompt", "image", "source")
        )
        ds = map_actors(ds, TokenizeActor, (self.cfg.model, self.tokenize_config()), pool, "pyarrow")
        return write_pass("tokenize", ds, self._sink("tokens", "tokenize", curated.ref), len(todo), t0)

    def tokenize_config(self) -> TokenizeConfig:
        """The tokenize config with, for depth conditions on the tiny preset without a depth estimator,
        the path of a tiny random one built once in the cache."""
        cfg = self.cfg.tokenize
        if cfg.condition != "depth" or cfg.depth_estimator_path:
            return cfg
        if self.cfg.model.preset != "tiny":
            raise ValueError(
                "tokenize.depth_estimator_path is required for depth conditions beyond the tiny preset"
            )
        from stylear_core.testing.tiny_depth import tiny_depth_estimator_dir

        built = tiny_depth_estimator_dir(self.cache_dir(), seed=self.cfg.model.seed)
        return replace(cfg, depth_estimator_path=str(built))

    def run(self) -> dict[str, Any]:
        """All passes (the masks pass alongside the others), then the manifest; returns the summary."""
        import ray.data

        t0 = time.time()
        ray.data.DataContext.get_current().enable_progress_bars = self.cfg.progress_bars
        write_manifest(self.out, MANIFEST_FORMAT, status="running", config=to_dict(self.cfg))
        # SAM masks depend on nothing else: their pass runs in a second thread (Ray Data executes two
        # datasets at once) while stylize -> mix -> tokenize run in order here.
        try:
            with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
                side = pool.submit(lambda: [self.mask_pass(), self.preference_pass()])
                self.passes.append(self.stylize_pass())
                mix = self.mix_passes()
                self.passes.append(self.tokenize_pass())
                self.passes.extend(side.result())
        except NoStylizedPairsError as e:
            write_manifest(self.out, MANIFEST_FORMAT, status="failed", config=to_dict(self.cfg), error=str(e))
            raise
        summary = self.summary(mix, time.time() - t0)
        if summary["mix"]["mode"] == "empty":
            log.warning("curated/ is empty: no readable raw pair and no stylized pair (see errors/)")
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
        kinds = (bool(sources.get("raw")), bool(sources.get("stylized")))
        mode = {(True, True): "mixed", (True, False): "raw_only", (False, True): "stylized_only"}.get(
            kinds, "empty"
        )
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
                "mode": mode,  # mixed, raw_only, stylized_only or empty (what curated/ holds)
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


def run_curation(cfg: CurationConfig, inputs: CurationInputs | None = None) -> dict[str, Any]:
    """Run the curation pipeline of ``cfg`` on the current Ray cluster (``ray.init`` first); returns the summary."""
    return CurationRun(cfg, inputs).run()


# The counts of what one run did (as opposed to the tables' totals after it).
RUN_COUNTS = (
    "rows_in", "requests_in", "raw_in", "references_in", "stylized", "filtered", "failed", "written",
    "masks_written", "preference_requests_written", "tokens_written", "processed",
)  # fmt: skip


def skipped_run_summary(stored: Mapping[str, Any]) -> dict[str, Any]:
    """The summary of a rerun on a finished output: the stored totals and mix, and no work done."""
    return {
        **stored, **dict.fromkeys(RUN_COUNTS, 0), "errors_by_stage": {}, "seconds": 0.0, "pass_seconds": {},
    }  # fmt: skip


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
        f"curated raw:stylized = {mix['curated_raw']}:{mix['curated_stylized']} = {ratio} "
        f"(target {mix['target_ratio']}; {mix.get('mode', 'mixed').replace('_', ' ')})",
        f"totals {summary['totals']} in {summary['seconds']}s (passes: {summary['pass_seconds']})",
    ]


__all__ = [
    "MANIFEST_FORMAT",
    "CurationRun",
    "NoStylizedPairsError",
    "preference_hold_out",
    "run_curation",
    "skipped_run_summary",
    "summary_lines",
]

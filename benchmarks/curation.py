"""Curation benchmark: the Ray Data pipeline vs a bare Python loop over the same actors' code, same run.

    python benchmarks/curation.py --preset tiny --device cpu                   # CPU, tiny random models
    python benchmarks/curation.py --preset lumina7b --device cuda [key=value]  # real sizes, one GPU node

Both sides curate the same inputs (synthetic unless the config names paths) into their own output
directory: stylize + CLIP-filter the requests, SAM-mask the references, mix raw pairs at the ratio,
tokenize the curated set. The Ray side is :func:`~stylear_core.curation.pipeline.run_curation` on a
local Ray instance (or ``--address``); the bare side calls the same actor classes (``StylizeActor``,
``ClipFilter``, ``MaskActor``, ``TokenizeActor``, ``normalize_raw_batch``) one batch at a time in this
process, with the same batch sizes, and writes with the same sink code. Both timings include model
construction (the Ray side builds its models in its actors). Printed: input rows, seconds and rows/s
of each side, and the ratio Ray / bare (the target on a GPU is >= 0.9).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.local import apply_project_env  # noqa: E402

apply_project_env()

from stylear_core.config import load_config  # noqa: E402
from stylear_core.curation.clip_filter import ClipFilter  # noqa: E402
from stylear_core.curation.config import CurationConfig  # noqa: E402
from stylear_core.curation.inputs import CurationInputs, load_inputs  # noqa: E402
from stylear_core.curation.mix import mix_raw_and_stylized  # noqa: E402
from stylear_core.curation.pipeline import CurationRun  # noqa: E402
from stylear_core.curation.stages import MaskActor, StylizeActor, normalize_raw_batch  # noqa: E402
from stylear_core.curation.tokenize import TokenizeActor  # noqa: E402
from stylear_core.data.passes import InputTable, RoutedParquetSink, table_dir  # noqa: E402
from stylear_core.data.schemas import TABLE_SCHEMAS  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "curate"


def bench_config(preset: str, device: str, out: Path, overrides: list[str]) -> CurationConfig:
    """The preset's shipped config on ``device``, writing under ``out``, with ``overrides`` applied last."""
    cfg = load_config(CurationConfig, CONFIGS / f"{preset}.yaml", overrides)
    cfg = replace(
        cfg,
        run_dir=str(out),
        stylizer=replace(cfg.stylizer, device=device),
        clip_filter=replace(cfg.clip_filter, device=device),
        sam=replace(cfg.sam, device=device),
        tokenize=replace(cfg.tokenize, device=device),
        progress_bars=False,
    )
    if device == "cpu":  # no GPU to ask for
        cfg = replace(
            cfg,
            **{
                name: replace(getattr(cfg, name), resources=replace(getattr(cfg, name).resources, gpus=0.0))
                for name in ("stylize_pool", "clip_pool", "sam_pool", "tokenize_pool")
            },
        )
    return cfg


def _batches(table: pa.Table, size: int):
    for start in range(0, table.num_rows, size):
        yield table.slice(start, size)


def _with_ids(table: pa.Table, ids) -> pa.Table:
    return table.filter(pc.is_in(table.column("id"), value_set=pa.array(sorted(ids), pa.string())))


def _rows(source: InputTable, ids) -> pa.Table:
    """The rows of an input whose id is in ``ids``, read in this process."""
    table = source.table if source.table is not None else pads.dataset(source.files).to_table()
    return _with_ids(table, ids)


class BareLoop:
    """The same curation, one batch at a time in this process (no Ray): what the Ray pipeline is measured against."""

    def __init__(self, cfg: CurationConfig, inputs: CurationInputs, out: Path) -> None:
        self.cfg, self.inputs, self.out = cfg, inputs, out
        self.tasks = 0

    def _sink(self, table: str, stage: str) -> RoutedParquetSink:
        return RoutedParquetSink(
            table_dir(self.out, table), TABLE_SCHEMAS[table], table_dir(self.out, "errors"), stage, "bench"
        )

    def _write(self, sink: RoutedParquetSink, tables: list[pa.Table]) -> pa.Table:
        """Write one table's batches as one sink task would; returns the good rows."""
        sink.on_write_start()
        sink.write(tables, SimpleNamespace(task_idx=self.tasks))
        self.tasks += 1
        if not tables:
            return sink.schema.empty_table()
        return sink.split(pa.concat_tables(tables, promote_options="permissive"))[0]

    def run(self) -> int:
        """Curate every input; returns the number of input rows processed (requests + raw + references)."""
        cfg = self.cfg
        resolved = CurationRun(cfg, self.inputs)
        stylizer = StylizeActor(resolved.stylizer_config())
        clip_filter = ClipFilter(resolved.clip_filter_config())
        masker = MaskActor(cfg.sam)
        tokenizer = TokenizeActor(cfg.model, cfg.tokenize)

        requests = _rows(self.inputs.requests, self.inputs.requests.ids())
        stylized_parts = []
        for batch in _batches(requests, cfg.stylize_pool.batch_size):
            stylized_parts.append(clip_filter(stylizer(batch.to_pydict())))
        stylized = self._write(self._sink("stylized", "stylize"), stylized_parts)

        references = _rows(self.inputs.references, self.inputs.references.ids())
        masks = [masker(b.to_pydict()) for b in _batches(references, cfg.sam_pool.batch_size)]
        self._write(self._sink("masks", "sam"), masks)

        # The same mix as the pipeline: redraw the raw pick until every picked raw row decoded.
        raw_ids, stylized_ids = self.inputs.raw.ids(), stylized.column("id").to_pylist()
        bad: set[str] = set()
        decoded: set[str] = set()
        curated_parts = []
        while True:
            pick = mix_raw_and_stylized(
                [i for i in raw_ids if i not in bad], stylized_ids, cfg.mix.ratio, cfg.mix.seed
            )
            todo = [i for i in pick.raw_ids if i not in decoded]
            if not todo:
                break
            for batch in _batches(_rows(self.inputs.raw, todo), cfg.decode_batch_size):
                out = normalize_raw_batch(batch)
                errors = out.column("error").to_pylist()
                bad |= {i for i, e in zip(out.column("id").to_pylist(), errors) if e is not None}
                curated_parts.append(out)
            decoded |= set(todo)
        curated_parts.append(_with_ids(stylized, pick.stylized_ids))
        curated = self._write(self._sink("curated", "decode"), curated_parts)

        columns = curated.select(["id", "prompt", "image", "source"])
        tokens = [tokenizer(b) for b in _batches(columns, cfg.tokenize_pool.batch_size)]
        self._write(self._sink("tokens", "tokenize"), tokens)
        return requests.num_rows + references.num_rows + len(decoded)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=("tiny", "lumina7b"), default="tiny")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--address", default="local", help="Ray cluster for the Ray side ('local' starts one)"
    )
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the curation config")
    args = parser.parse_args(argv)

    import ray

    work = Path(tempfile.mkdtemp(prefix="bench-curation-"))
    cfg = bench_config(args.preset, args.device, work, args.overrides)
    inputs = load_inputs(cfg.inputs)
    if not ray.is_initialized():
        local = args.address == "local"
        ray.init(
            address=args.address,
            num_cpus=args.num_cpus if local else None,
            include_dashboard=False,
            log_to_driver=False,
            # A private instance on loopback with its own temp dir, so it cannot meet another cluster.
            **({"_node_ip_address": "127.0.0.1", "_temp_dir": str(work / "ray_tmp")} if local else {}),
        )
    # Build the tiny stylizer's files once, outside both timings.
    cfg = replace(cfg, stylizer=CurationRun(cfg, inputs).stylizer_config())

    start = time.perf_counter()
    summary = CurationRun(replace(cfg, output_dir=str(work / "ray")), inputs).run()
    ray_s = time.perf_counter() - start
    ray_rows = summary["rows_in"]

    start = time.perf_counter()
    bare_rows = BareLoop(cfg, inputs, work / "bare").run()
    bare_s = time.perf_counter() - start

    print(f"curation benchmark: preset {args.preset}, device {args.device}, outputs in {work}")
    print(f"  ray data pipeline: {ray_rows} rows in {ray_s:.1f} s = {ray_rows / ray_s:.2f} rows/s")
    print(f"  bare python loop:  {bare_rows} rows in {bare_s:.1f} s = {bare_rows / bare_s:.2f} rows/s")
    print(f"  ratio ray / bare:  {(ray_rows / ray_s) / (bare_rows / bare_s):.3f}  (GPU target >= 0.9)")


if __name__ == "__main__":
    main()

"""Curation benchmark: the Ray Data pipeline vs a bare Python loop over the same actors' code, same run.

    python benchmarks/curation.py --preset tiny --device cpu                   # CPU, tiny random models
    python benchmarks/curation.py --preset lumina7b --device cuda [key=value]  # real sizes, one GPU node

Both sides curate the same inputs (synthetic unless the config names paths) into their own output
directory: stylize + CLIP-filter the requests, SAM-mask the references, mix raw pairs at the ratio,
tokenize the curated set. The Ray side is :func:`~stylear_core.curation.pipeline.run_curation` on a
local Ray instance (or ``--address``); the bare side calls the same actor classes (``StylizeActor``,
``ClipFilter``, ``MaskActor``, ``TokenizeActor``, ``normalize_raw_batch``) one batch at a time in this
process, with the same batch sizes, and writes with the same sink code; the output tables of the two
must hold the same rows (checked and printed).

Steady state and start-up are measured apart: after a cold first run of each side (printed, not
fitted), each side runs at every ``--sizes`` multiple of the config's inputs (default x2 and x8: 224
and 908 input rows on the tiny preset), ``--repeats`` times, sizes interleaved. Per repeat a line
``seconds = start-up + rows / rate`` through the sizes gives the steady-state rate (the slope: extra
rows per extra second) and the start-up (the intercept: actor start-up and model construction, pass
set-up); the median and range over repeats are printed, by wall clock and by the CPU time of the
whole process tree (this process and the local Ray instance it starts; that figure is robust to other
work on the machine). On CPU both sides are pinned to the same single core (``--cores``): the bare
loop is one process, the Ray side gets that core for its driver, raylet and one actor per pool. Last
comes the Ray side's CPU time per process (ms per extra row, and seconds at the smallest size), which
shows where its overhead goes. The target is a steady-state ratio Ray / bare >= 0.9.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

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
from stylear_core.data.passes import InputTable, RoutedParquetSink, read_table, table_dir  # noqa: E402
from stylear_core.data.schemas import TABLE_SCHEMAS  # noqa: E402
from stylear_core.ray_connection import short_temp_dir  # noqa: E402

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


def scaled_config(cfg: CurationConfig, factor: float) -> CurationConfig:
    """``cfg`` with ``factor`` times its synthetic inputs (raw pairs, requests, styles), or its ``inputs.limit``
    when the config names input paths."""
    i = cfg.inputs
    if i.raw_path or i.requests_path or i.references_path:
        if not i.limit:
            raise ValueError("with input paths, set inputs.limit: the sizes multiply it")
        return replace(cfg, inputs=replace(i, limit=max(1, round(i.limit * factor))))
    scale = {
        n: max(1, round(getattr(i, n) * factor))
        for n in ("synthetic_raw", "synthetic_requests", "synthetic_styles")
    }
    return replace(cfg, inputs=replace(i, **scale))


def steady_state(rows: Sequence[float], seconds: Sequence[float]) -> tuple[float, float]:
    """Fit ``seconds = start_up + rows / rate`` to runs of different sizes (least squares); ``(rate, start_up)``.

    The rate is the steady state (extra rows per extra second) and the start-up what a run costs
    before its first row counts (actor and model construction, pass set-up): the line's intercept.
    """
    if len(rows) != len(seconds) or len(set(rows)) < 2:
        raise ValueError("need runs of at least two different sizes")
    n = len(rows)
    mr, ms = sum(rows) / n, sum(seconds) / n
    slope = sum((r - mr) * (s - ms) for r, s in zip(rows, seconds)) / sum((r - mr) ** 2 for r in rows)
    if slope <= 0:
        raise ValueError(
            f"time does not grow with rows (slope {slope:.3g} s/row): runs too noisy or too small"
        )
    return 1.0 / slope, ms - slope * mr


def table_rows(output_dir: Path) -> dict[str, int]:
    """Rows in each output table of a curation output directory (what both sides must agree on)."""
    counts = {}
    for name in TABLE_SCHEMAS:
        table = read_table(table_dir(output_dir, name), ["id"])
        counts[name] = table.num_rows if table is not None else 0
    return counts


def _process_ticks() -> tuple[dict[int, list[int]], dict[int, int]]:
    """Every process's children and its CPU ticks (own user + system, plus its waited-for children's)."""
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process exited while we looked
        pid = int(entry.name)
        children.setdefault(int(fields[1]), []).append(pid)  # fields[1]: ppid
        ticks[pid] = sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    return children, ticks


def tree_cpu_seconds(root: int | None = None) -> dict[int, float]:
    """CPU seconds used so far by process ``root`` (this one by default) and each live process under it, by pid.

    Read from ``/proc`` (Linux); a process's figure includes its children that exited and were waited for.
    """
    children, ticks = _process_ticks()
    out, todo = {}, [os.getpid() if root is None else root]
    while todo:
        pid = todo.pop()
        out[pid] = ticks.get(pid, 0) / os.sysconf("SC_CLK_TCK")
        todo.extend(children.get(pid, []))
    return out


class CpuMeter:
    """CPU seconds of this process and every process under it (the local Ray instance it started) over a block.

    Ray's worker processes are not waited for by their parent, so an actor's time vanishes from
    ``/proc`` when it exits: the meter samples the tree every ``interval`` seconds and keeps each
    process's last figure (what a process uses in its last ``interval`` before exiting is missed).
    ``seconds`` holds the total after the block, ``by_process`` the share of each command name.
    """

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.seconds = 0.0
        self.by_process: dict[str, float] = {}

    def __enter__(self) -> CpuMeter:
        self._start = tree_cpu_seconds()
        self._last: dict[int, float] = dict(self._start)
        self._names: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _take(self) -> None:
        for pid, cpu in tree_cpu_seconds().items():
            self._last[pid] = max(cpu, self._last.get(pid, 0.0))
            try:  # read each time: a Ray worker renames itself (ray::IDLE, ray::MapWorker(...)) once it has a job
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            name = Path(cmd[0].decode()).name
            if name.startswith("python") and len(cmd) > 1:  # a Ray worker before it names itself
                name = Path(cmd[1].decode()).name
            if name.strip():  # an exited, not yet reaped process has an empty command line
                self._names[pid] = name.strip()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._take()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._take()
        for pid, cpu in self._last.items():
            used = cpu - self._start.get(pid, 0.0)
            name = Path(self._names.get(pid, "?")).name
            self.by_process[name] = self.by_process.get(name, 0.0) + used
            self.seconds += used


def pin_cores(cores: int) -> list[int]:
    """Pin this process, and so every process it starts (the local Ray instance), to ``cores`` CPUs."""
    allowed = sorted(os.sched_getaffinity(0))
    if cores <= 0 or cores >= len(allowed):
        return allowed
    chosen = allowed[:cores]
    os.sched_setaffinity(0, chosen)
    return chosen


def _warm_imports() -> None:
    # The models' modules are imported once before any timing so the first timed run does not pay them.
    import diffusers  # noqa: F401
    import torch  # noqa: F401

    from stylear_core.curation.stylizer import per_row_style_pipeline_class

    per_row_style_pipeline_class()


def _spread(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.2f} (min {min(values):.2f}, max {max(values):.2f}, n={len(values)})"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark (see the module docstring); returns the figures it printed."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=("tiny", "lumina7b"), default="tiny")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--address", default="local", help="Ray cluster for the Ray side ('local' starts one)"
    )
    parser.add_argument(
        "--sizes", default="2,8", help="input sizes as multiples of the config's inputs (two or more)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side at each size")
    parser.add_argument(
        "--cores",
        type=int,
        default=None,
        help="physical cores both sides run on (this process and the local Ray instance are pinned to "
        "them); default 1 on cpu (the bare loop is one process), all on cuda; 0 = all",
    )
    parser.add_argument(
        "--num-cpus", type=int, default=4, help="logical CPUs of the local Ray instance (room for every pool)"
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the curation config")
    args = parser.parse_args(argv)
    sizes = [float(s) for s in args.sizes.split(",")]
    if len(set(sizes)) < 2:
        parser.error("--sizes needs at least two different sizes")

    import ray

    cores = pin_cores(args.cores if args.cores is not None else (1 if args.device == "cpu" else 0))
    work = Path(tempfile.mkdtemp(prefix="bench-curation-"))
    base = bench_config(args.preset, args.device, work, args.overrides)
    if not ray.is_initialized():
        local = args.address == "local"
        ray.init(
            address=args.address,
            num_cpus=args.num_cpus if local else None,
            include_dashboard=False,
            log_to_driver=False,
            # A private instance on loopback with its own temp dir, so it cannot meet another cluster.
            **({"_node_ip_address": "127.0.0.1", "_temp_dir": short_temp_dir("bench-cur-")} if local else {}),
        )
    _warm_imports()
    # Inputs are made, and the tiny stylizer's files built, once per size, outside both timings.
    runs = []
    for size in sizes:
        cfg = scaled_config(base, size)
        inputs = load_inputs(cfg.inputs)
        cfg = replace(cfg, stylizer=CurationRun(cfg, inputs).stylizer_config())
        runs.append((size, cfg, inputs))

    times: dict[str, dict[float, list[float]]] = {"ray": {}, "bare": {}}
    cpu_s: dict[str, dict[float, list[float]]] = {"ray": {}, "bare": {}}
    pass_s: dict[float, dict[str, float]] = {}
    rows: dict[str, dict[float, int]] = {"ray": {}, "bare": {}}
    tables: dict[str, dict[float, dict[str, int]]] = {"ray": {}, "bare": {}}
    # A first run of each side at the smallest size, outside the fits: it pays what only the first run
    # does (Ray Data's own actors, the first worker processes, lazy imports).
    size, cfg, inputs = runs[0]
    start = time.perf_counter()
    CurationRun(replace(cfg, output_dir=str(work / "ray-first")), inputs).run()
    first = {"ray": time.perf_counter() - start}
    start = time.perf_counter()
    BareLoop(cfg, inputs, work / "bare-first").run()
    first["bare"] = time.perf_counter() - start
    ray_cpu_by_process: dict[str, dict[float, float]] = {}
    for repeat in range(args.repeats):
        # Sizes alternate direction between repeats so neither size always runs first.
        for size, cfg, inputs in runs if repeat % 2 == 0 else runs[::-1]:
            out = work / f"ray-{size:g}-{repeat}"
            start = time.perf_counter()
            with CpuMeter() as cpu:
                summary = CurationRun(replace(cfg, output_dir=str(out)), inputs).run()
            times["ray"].setdefault(size, []).append(time.perf_counter() - start)
            cpu_s["ray"].setdefault(size, []).append(cpu.seconds)
            for name, used in cpu.by_process.items():
                by_size = ray_cpu_by_process.setdefault(name, {})
                by_size[size] = by_size.get(size, 0.0) + used / args.repeats
            pass_s[size] = summary["pass_seconds"]
            rows["ray"][size], tables["ray"][size] = summary["rows_in"], table_rows(out)

            out = work / f"bare-{size:g}-{repeat}"
            start = time.perf_counter()
            with CpuMeter() as cpu:
                bare_rows = BareLoop(cfg, inputs, out).run()
            times["bare"].setdefault(size, []).append(time.perf_counter() - start)
            cpu_s["bare"].setdefault(size, []).append(cpu.seconds)
            rows["bare"][size], tables["bare"][size] = bare_rows, table_rows(out)

    print(f"curation benchmark: preset {args.preset}, device {args.device}, outputs in {work}")
    print(
        f"  compute: both sides pinned to cores {cores} ({len(cores)} core(s)); bare = 1 process; "
        f"ray = driver + raylet + one actor per pool ({args.num_cpus} logical CPUs), same cores"
    )
    print(
        f"  first run (cold, x{sizes[0]:g}, not fitted): ray {first['ray']:.1f} s, bare {first['bare']:.1f} s"
    )
    for size in sizes:
        same = tables["ray"][size] == tables["bare"][size]
        print(
            f"  size x{size:g}: {rows['ray'][size]} rows in; ray {_spread(times['ray'][size])} s, "
            f"bare {_spread(times['bare'][size])} s; CPU s ray {_spread(cpu_s['ray'][size])}, "
            f"bare {_spread(cpu_s['bare'][size])}; output tables "
            f"{'match' if same else 'DIFFER'} {tables['ray'][size] if same else tables}"
        )
    figures: dict[str, Any] = {"sizes": sizes, "rows": rows, "seconds": times, "cpu_seconds": cpu_s}
    figures["cores"], figures["ray_pass_seconds"] = cores, pass_s
    figures["tables_match"] = all(tables["ray"][s] == tables["bare"][s] for s in sizes)
    # One fit per repeat and side (its runs at every size), so the spread shows the noise of the machine.
    for clock, measured, unit in (("wall", times, "rows/s"), ("cpu", cpu_s, "rows per CPU-second")):
        fits = {
            side: [
                steady_state([rows[side][s] for s in sizes], [measured[side][s][r] for s in sizes])
                for r in range(args.repeats)
            ]
            for side in ("ray", "bare")
        }
        label = "wall clock" if clock == "wall" else "CPU time of all processes (robust to other load)"
        print(f"  steady state by {label}:")
        for side, name in (("ray", "ray data pipeline"), ("bare", "bare python loop")):
            rates, starts = [f[0] for f in fits[side]], [f[1] for f in fits[side]]
            print(f"    {name + ':':19s} {_spread(rates)} {unit}; start-up {_spread(starts)} s")
            figures[f"{side}_{clock}"] = {"rates": rates, "start_up_s": starts}
        ratios = [r[0] / b[0] for r, b in zip(fits["ray"], fits["bare"])]
        figures[f"ratio_{clock}"] = ratios
        print(f"    ratio ray / bare:   {_spread(ratios)}")
    largest = max(sizes)
    print(
        f"  steady-state ratio ray / bare (wall clock, slope from {min(rows['ray'].values())} to "
        f"{max(rows['ray'].values())} input rows): {statistics.median(figures['ratio_wall']):.3f} "
        f"(target >= 0.9)"
    )
    whole = statistics.median(times["bare"][largest]) / statistics.median(times["ray"][largest])
    print(
        f"  whole-run ratio at x{largest:g} (start-up included): {whole:.3f}; ray passes (s): {pass_s[largest]}"
    )
    # Where the Ray side's CPU goes, per process: start-up (at the smallest size) and ms per extra row.
    small, extra_rows = min(sizes), rows["ray"][largest] - rows["ray"][min(sizes)]
    per_row = {
        n: (1e3 * (v.get(largest, 0.0) - v.get(small, 0.0)) / extra_rows, v.get(small, 0.0))
        for n, v in ray_cpu_by_process.items()
    }
    bare_ms = 1e3 / statistics.median(figures["bare_cpu"]["rates"])
    print(f"  ray side CPU by process: ms per extra row (bare loop: {bare_ms:.1f} in all) / s at x{small:g}:")
    for name, (ms, at_small) in sorted(per_row.items(), key=lambda kv: -kv[1][0])[:10]:
        print(f"    {name[:60]:60s} {ms:7.2f} ms/row {at_small:7.2f} s")
    figures["first_run_seconds"], figures["ray_cpu_by_process"] = first, ray_cpu_by_process
    return figures


if __name__ == "__main__":
    main()

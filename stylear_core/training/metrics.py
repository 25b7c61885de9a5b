"""Per-step training metrics: throughput meter on the workers, JSONL log and progress bar on the controller.

Workers report through ``ray.train.report`` every few steps: the latest step's metrics plus a
``history`` list with one row per step since the last report (rank 0's values are already reduced
over all ranks). :class:`MetricsLogCallback` runs in the Ray Train controller, which
Ray places on the driver's node: it appends each step to ``metrics.jsonl`` in the run directory and
advances a Ray progress bar (``ray.experimental.tqdm_ray``, drawn by the driver). The bar is closed at
the run's last step and when a worker fails: the driver redraws every open bar around each line it
prints, so a bar left open would repeat itself in the logs of every later stage of a pipeline job.

After a restart from a checkpoint at step ``s`` the steps after ``s`` run again; the log drops its
lines for those steps first, so ``metrics.jsonl`` always reads as one run, each step once.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import ray.train

METRICS_LOG_NAME = "metrics.jsonl"


def read_metrics_log(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (one dict per logged step, in step order)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLogCallback(ray.train.UserCallback):
    """Controller-side sink of reported metrics: a JSONL file and a progress bar over ``total_steps``.

    Takes the JSONL path (its directory is created) and the run's total optimizer steps. Reports
    without a ``step`` key are ignored.
    """

    def __init__(self, path: str | Path, total_steps: int, description: str = "train"):
        self.path = str(Path(path).resolve())
        self.total_steps = total_steps
        self.description = description
        self._bar = None
        self._last_step = 0

    def _truncate_from(self, step: int) -> None:
        rows = [r for r in read_metrics_log(self.path) if int(r.get("step", 0)) < step]
        Path(self.path).write_text("".join(json.dumps(r) + "\n" for r in rows))

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        """Log the steps of one report (rank 0's ``history`` rows, or its metrics) and advance the bar."""
        if not metrics:
            return
        rows = metrics[0].get("history") or [metrics[0]]
        rows = [{k: v for k, v in r.items() if k != "history"} for r in rows if "step" in r]
        if not rows:
            return
        first = int(rows[0]["step"])
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        if first <= self._last_step or (self._last_step == 0 and Path(self.path).exists()):
            self._truncate_from(first)  # a restarted attempt repeats steps after its checkpoint
        with open(self.path, "a") as f:
            f.writelines(json.dumps(r, default=float) + "\n" for r in rows)
        self._last_step = int(rows[-1]["step"])
        if self._bar is None:
            from ray.experimental.tqdm_ray import tqdm

            self._bar = tqdm(total=self.total_steps, desc=self.description)
        self._bar.update(max(0, self._last_step - self._bar.n))
        self._bar.set_description(f"{self.description} loss {rows[-1].get('loss', float('nan')):.4f}")
        if self._last_step >= self.total_steps:
            self._close_bar()

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        """Close the bar; a restarted attempt opens a new one at its first report."""
        self._close_bar()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()  # flushes the final state, then the driver forgets the bar
            self._bar = None


class ThroughputMeter:
    """Wall-clock throughput between marks: ``mark(tokens)`` -> tokens per second since the last mark."""

    def __init__(self) -> None:
        self._t = time.perf_counter()

    def mark(self, tokens: float) -> tuple[float, float]:
        """``(seconds since the last mark, tokens / seconds)``; restarts the clock."""
        now = time.perf_counter()
        seconds, self._t = now - self._t, now
        return seconds, tokens / max(seconds, 1e-9)

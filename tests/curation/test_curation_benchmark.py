"""The curation benchmark's arithmetic: the steady-state fit, the input scaling and the CPU-time count."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from benchmarks.curation import CpuMeter, bench_config, scaled_config, steady_state


def test_steady_state_recovers_rate_and_start_up_of_a_known_line():
    # 12 s of start-up, then 40 rows/s: 100 rows in 14.5 s, 300 in 19.5 s, 500 in 24.5 s.
    rows = [100, 300, 500]
    seconds = [12 + r / 40 for r in rows]
    rate, start_up = steady_state(rows, seconds)
    assert math.isclose(rate, 40.0) and math.isclose(start_up, 12.0)
    # Two sizes are enough; the whole-run rate would have said 500 / 24.5 = 20 rows/s.
    rate, start_up = steady_state([100, 500], [14.5, 24.5])
    assert math.isclose(rate, 40.0) and math.isclose(start_up, 12.0)


def test_steady_state_refuses_fits_it_cannot_make():
    with pytest.raises(ValueError, match="two different sizes"):
        steady_state([100, 100], [3.0, 4.0])
    with pytest.raises(ValueError, match="does not grow"):
        steady_state([100, 200], [5.0, 4.0])


def test_sizes_scale_every_synthetic_input(tmp_path):
    cfg = bench_config("tiny", "cpu", tmp_path, [])
    scaled = scaled_config(cfg, 3)
    for name in ("synthetic_raw", "synthetic_requests", "synthetic_styles"):
        assert getattr(scaled.inputs, name) == 3 * getattr(cfg.inputs, name)
    with pytest.raises(ValueError, match="inputs.limit"):
        scaled_config(bench_config("tiny", "cpu", tmp_path, ["inputs.raw_path=/nowhere"]), 2)


def test_cpu_meter_counts_a_child_process_that_has_exited():
    spin = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end:\n    pass\n"
    with CpuMeter(interval=0.05) as meter:
        subprocess.run([sys.executable, "-c", spin], check=True)
    assert meter.seconds >= 0.25 and meter.by_process

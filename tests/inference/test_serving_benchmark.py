"""The serving benchmark runs on CPU with the tiny preset and reports consistent ratios."""

from __future__ import annotations

import math

from benchmarks.serving import SCHEDULERS, main, poisson_arrivals, summarize


def test_tiny_cpu_serving_benchmark_reports_each_scheduler_and_the_ratios(capsys):
    rows = main(["--sizes", "32,64", "--slots", "4", "--requests", "4", "--repeats", "1", "--rates", "40",
                 "--threads", "1"])  # fmt: skip
    out = capsys.readouterr().out
    (row,) = rows
    assert row["rate"] == 40.0
    for value in row.values():
        assert math.isfinite(value) and value > 0
    for name in SCHEDULERS:
        assert row[f"{name}_p99_s"] >= row[f"{name}_p50_s"]
    assert math.isclose(
        row["throughput_vs_batch"], row["continuous_images_per_s"] / row["batch_images_per_s"]
    )
    assert math.isclose(row["p50_vs_generate"], row["continuous_p50_s"] / row["generate_p50_s"])
    assert "continuous vs generate" in out


def test_arrivals_and_summary():
    arrivals = poisson_arrivals(10.0, 2000, seed=1)
    assert arrivals[0] == 0.0 and all(b > a for a, b in zip(arrivals, arrivals[1:]))
    assert 0.18 < arrivals[-1] / 2000 * 2 < 0.22  # mean gap 1/rate
    summary = summarize([1.0, 2.0, 3.0, 10.0], [0.0, 0.0, 1.0, 1.0])
    assert summary == {"images_per_s": 4 / 11.0, "p50_s": 2.5, "p99_s": 10.0}

"""The training benchmark runs on CPU with the tiny preset and reports consistent figures."""

from __future__ import annotations

import math

from benchmarks.train import main, synthetic_rows
from stylear_core.data.layout import ImageTokenLayout


def test_tiny_cpu_benchmark_reports_throughput_mfu_and_ratios(capsys, model_cfg, vocab):
    summary = main(["--preset", "tiny", "--runners", "plain,deepspeed", "--steps", "2", "--warmup", "1"])
    out = capsys.readouterr().out
    results = summary["results"]
    assert set(results) == {"plain", "deepspeed"}
    params = results["plain"]["params"]
    assert params == 241056  # the tiny backbone: 6N uses every backbone parameter
    for r in results.values():
        assert r["step_s"] > 0 and r["tokens"] > 0
        assert math.isclose(r["tokens_per_s"], r["tokens"] / r["step_s"])
        assert math.isclose(r["vs_plain"], r["tokens_per_s"] / results["plain"]["tokens_per_s"])
        assert 0 < r["mfu"] < 1
    # Two rows of (prompt + one 64 px image) per step.
    layout = ImageTokenLayout.for_resolution(64, 64, vocab)
    assert summary["seq"] == len(synthetic_rows(model_cfg, 1)[0]["prompt_ids"]) + layout.num_tokens
    assert results["plain"]["tokens"] == 2 * summary["seq"]
    assert "MFU" in out and "of plain" in out

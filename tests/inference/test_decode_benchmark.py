"""The decode benchmark runs on CPU with the tiny preset and reports consistent ratios."""

from __future__ import annotations

import math

import torch

from benchmarks.decode import copy_bandwidth, kv_bytes, main, streamed_weight_bytes
from stylear_core.models.backbone import tiny_backbone


def test_tiny_cpu_benchmark_reports_every_figure_as_a_ratio(capsys):
    rows = main(["--preset", "tiny", "--device", "cpu", "--size", "64", "--images", "1,2", "--repeats", "1",
                 "--hf-steps", "8", "--threads", "1"])  # fmt: skip
    out = capsys.readouterr().out
    assert [r["images"] for r in rows] == [1, 2] and [r["rows"] for r in rows] == [2, 4]
    for r in rows:
        for value in r.values():
            assert math.isfinite(value) and value > 0
        assert math.isclose(r["speedup_vs_generate"], r["generate_ms_per_step"] / r["engine_ms_per_step"])
        assert math.isclose(r["engine_over_floor"], r["engine_ms_per_step"] / r["floor_ms"])
        assert r["floor_kv_ms"] > r["floor_ms"]
    assert "speed-up" in out and "floor" in out


def test_floor_inputs():
    lm = tiny_backbone()
    embedding = lm.get_input_embeddings().weight
    total = sum(p.numel() * 4 for p in lm.parameters())
    assert streamed_weight_bytes(lm) == total - embedding.numel() * 4
    # 2 (K and V) x 2 layers x 3 rows x 10 positions x 4 heads x 16 dims x 4 bytes
    assert kv_bytes(lm, rows=3, positions=10, element_size=4) == 2 * 2 * 3 * 10 * 4 * 16 * 4
    assert copy_bandwidth(torch.device("cpu"), megabytes=8, repeats=2) > 1e8

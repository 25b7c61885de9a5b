"""The decode benchmark runs on CPU with the tiny preset and reports consistent ratios."""

from __future__ import annotations

import json
import math

import torch

from benchmarks.decode import copy_bandwidth, kv_bytes, main, streamed_weight_bytes
from stylear_core.models.backbone import tiny_backbone

TINY = ["--preset", "tiny", "--device", "cpu", "--size", "64", "--repeats", "1", "--hf-steps", "8",
        "--mid-steps", "4", "--threads", "1"]  # fmt: skip
MID_KEYS = {"mid_ms_per_step", "mid_roofline_fraction"}
LORA_KEYS = {"mid_lora_ms_per_step", "lora_overhead"}


def test_tiny_cpu_benchmark_reports_every_figure_as_a_ratio(capsys, tmp_path):
    path = tmp_path / "decode.json"
    rows = main([*TINY, "--images", "1,2", "--json", str(path)])  # the default --lora-rank (8)
    out = capsys.readouterr().out
    assert [r["images"] for r in rows] == [1, 2] and [r["rows"] for r in rows] == [2, 4]
    for r in rows:
        assert r.keys() >= MID_KEYS | LORA_KEYS
        for value in r.values():
            assert math.isfinite(value) and value > 0
        assert math.isclose(r["speedup_vs_generate"], r["generate_ms_per_step"] / r["engine_ms_per_step"])
        assert math.isclose(r["engine_over_floor"], r["engine_ms_per_step"] / r["floor_ms"])
        assert r["floor_kv_ms"] > r["floor_ms"]
        # The mid-image figure as a fraction of the weights+KV roofline, and the adapter's cost.
        assert math.isclose(r["mid_roofline_fraction"], r["floor_kv_ms"] / r["mid_ms_per_step"])
        assert math.isclose(r["lora_overhead"], r["mid_lora_ms_per_step"] / r["mid_ms_per_step"])
    assert "speed-up" in out and "floor" in out and "mid ms/step" in out and "+LoRA ms/step" in out
    report = json.loads(path.read_text())
    assert report["rows"] == rows
    assert report["preset"] == "tiny" and report["size"] == 64 and report["device"] == "cpu"
    assert report["bandwidth_gb_s"] > 0.1


def test_lora_rank_zero_skips_the_lora_figure(capsys):
    rows = main([*TINY, "--images", "1", "--lora-rank", "0"])
    out = capsys.readouterr().out
    assert len(rows) == 1 and rows[0].keys() >= MID_KEYS
    assert not LORA_KEYS & rows[0].keys() and "LoRA" not in out
    assert math.isfinite(rows[0]["mid_ms_per_step"]) and rows[0]["mid_ms_per_step"] > 0


def test_floor_inputs():
    lm = tiny_backbone()
    embedding = lm.get_input_embeddings().weight
    total = sum(p.numel() * 4 for p in lm.parameters())
    assert streamed_weight_bytes(lm) == total - embedding.numel() * 4
    # 2 (K and V) x 2 layers x 3 rows x 10 positions x 4 heads x 16 dims x 4 bytes
    assert kv_bytes(lm, rows=3, positions=10, element_size=4) == 2 * 2 * 3 * 10 * 4 * 16 * 4
    assert copy_bandwidth(torch.device("cpu"), megabytes=8, repeats=2) > 1e8

"""The training benchmark runs on CPU with the tiny preset and reports consistent figures."""

from __future__ import annotations

import math

from benchmarks.train import main, synthetic_rows
from stylear_core.data.layout import ImageTokenLayout


def test_tiny_cpu_benchmark_reports_throughput_mfu_and_ratios(capsys, model_cfg, vocab):
    summary = main(
        ["--preset", "tiny", "--runners", "plain,plain_masked,deepspeed", "--steps", "2", "--warmup", "1"]
    )
    out = capsys.readouterr().out
    results = summary["results"]
    assert set(results) == {"plain", "plain_masked", "deepspeed"}
    counts = summary["flop_counts"]
    # N: the LoRA-injected tiny backbone (241056 parameters) without its 1024 x 64 embedding table.
    assert counts["compute_params"] == 241056 - 1024 * 64
    assert 0 < counts["trainable_params"] < counts["compute_params"] / 10  # LoRA only
    step = summary["step_flops"]
    assert step["hardware"] > step["model"] > 4 * counts["compute_params"] * step["tokens"]
    for r in results.values():
        assert r["step_s"] > 0 and r["tokens"] > 0
        assert math.isclose(r["tokens_per_s"], r["tokens"] / r["step_s"])
        assert math.isclose(r["vs_plain"], r["tokens_per_s"] / results["plain"]["tokens_per_s"])
        assert 0 < r["mfu"] < r["hfu"] < 1
        assert math.isclose(r["hfu"] / r["mfu"], step["hardware"] / step["model"])
    # Mixed-length rows: within each micro-batch of two the prompt lengths differ.
    lengths = summary["row_lengths"]
    assert len(set(lengths[:2])) == 2 and lengths[:2] == lengths[2:4]
    layout = ImageTokenLayout.for_resolution(64, 64, vocab)
    rows = synthetic_rows(model_cfg, 2)
    assert lengths[:2] == [len(r["prompt_ids"]) + layout.num_tokens for r in rows]
    # Tokens are the real (unpadded) tokens of one micro-batch, on both attention paths.
    assert results["plain"]["tokens"] == results["plain_masked"]["tokens"] == sum(lengths[:2])
    assert "MFU = [(4N + 2N_train)" in out and "HFU = [model FLOPs" in out and "of plain" in out
    assert "padding-free vs masked attention" in out

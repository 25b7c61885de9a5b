"""The DPO job on real Ray Train + DeepSpeed (2 CPU workers, ZeRO-2) on a tiny preference set."""

from __future__ import annotations

import pytest
import torch

from stylear_core.adapters.io import load_adapter
from stylear_core.adapters.probe import verify_adapter
from stylear_core.models.presets import build_stylear_model
from stylear_core.runs import read_manifest
from stylear_core.training.loop import group_digests
from stylear_core.training.metrics import read_metrics_log
from stylear_core.training.objectives import StyleDPOObjective

pytestmark = pytest.mark.usefixtures("ray_session")


def test_dpo_reward_margin_grows_and_accuracy_ends_above_half(
    tmp_path, sft_adapter, preference_pairs, model_cfg, job_runner
):
    summary = job_runner(
        "train_dpo",
        tmp_path,
        f"sft_adapter={sft_adapter}",
        f"pairs={preference_pairs}",
        "train.max_steps=8",
        "train.checkpoint_every=4",
    )
    out = tmp_path / "train_dpo"
    rows = read_metrics_log(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9))
    # Step 1 runs the policy as initialised: the SFT adapter itself, i.e. exactly the reference.
    assert rows[0]["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    first = sum(r["reward_margin"] for r in rows[:2]) / 2
    last = sum(r["reward_margin"] for r in rows[-2:]) / 2
    assert last > first + 0.05, [r["reward_margin"] for r in rows]
    assert rows[-1]["accuracy"] > 0.5 and summary["accuracy"] == rows[-1]["accuracy"]
    assert sum(r["loss"] for r in rows[-2:]) / 2 < 0.6931
    # The reference adapter, the resampler, the base and CLIP never moved; the policy did.
    start = StyleDPOObjective(model_cfg, str(sft_adapter))
    start.setup(torch.device("cpu"), "fp32")
    initial = group_digests(start.parameter_groups(), rank=0)
    for frozen in ("reference", "resampler", "base", "clip"):
        assert rows[-1][f"digest/{frozen}"] == initial[frozen], frozen
    assert rows[-1]["digest/lora"] != initial["lora"]
    manifest = read_manifest(out / "adapter")
    assert manifest["status"] == "complete" and manifest["sft_adapter"] == str(sft_adapter)
    sft = load_adapter(build_stylear_model(model_cfg), sft_adapter)
    assert verify_adapter(sft, out / "adapter") > 1e-4  # the DPO policy is not the SFT model any more
    dpo = load_adapter(build_stylear_model(model_cfg), out / "adapter")
    assert verify_adapter(dpo, out / "adapter") < 1e-5

"""DPO's reference log-probs scored once and stored with the pairs: the same loss as the live reference
model, no reference forward per step, and values for another reference refused (or scored again)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from stylear_core.config import ConfigError, load_config
from stylear_core.data.schemas import PREFERENCE_PAIRS_SCHEMA, validate_table
from stylear_core.models.lora import DEFAULT_ADAPTER
from stylear_core.preferences.pairs import (
    PreferencePairSampler,
    PreferenceSamplingConfig,
    synthetic_style_requests,
)
from stylear_core.preferences.reference import (
    ReferenceLogProbScorer,
    reference_digest,
    reference_logps_state,
)
from stylear_core.testing.fixtures import numpy_batch, perturb_, tiny_adapter
from stylear_core.training.metrics import read_metrics_log
from stylear_core.training.objectives import REFERENCE_ADAPTER, StyleDPOObjective
from stylear_core.training.stages import DPOTrainConfig, resolve_reference_logps

CPU = torch.device("cpu")


def dpo_step(model_cfg, sft_adapter, table, mode: str, noise: float = 0.0, perturb: bool = True):
    """One ``compute`` + backward on the first 3 pairs of ``table``: (result, policy grads, backbone forwards,
    objective)."""
    objective = StyleDPOObjective(
        model_cfg, str(sft_adapter), beta=0.5, noise_strength=noise, reference_logps=mode
    )
    module = objective.setup(CPU, "fp32")
    policy = [p for n, p in module.backbone.named_parameters() if f".lora_B.{DEFAULT_ADAPTER}." in n]
    if perturb:
        perturb_(policy, seed=7)  # the policy has moved away from the SFT reference
    forwards = []
    module.backbone.register_forward_hook(lambda *_: forwards.append(1))
    batch = objective.collate_fn()(numpy_batch(table.slice(0, 3)))
    result = objective.compute(module, batch)
    result.loss.backward()
    return result, [p.grad.clone() for p in policy], len(forwards), objective


@pytest.fixture(scope="module")
def scored_pairs(model_cfg, sft_adapter, preference_pairs):
    """The fixture pairs with reference log-probs at noise 0, scored once."""
    scorer = ReferenceLogProbScorer(model_cfg, str(sft_adapter), 0.0, device="cpu")
    return scorer(pq.read_table(preference_pairs))


def test_cached_reference_gives_the_live_loss_without_a_reference_forward(
    model_cfg, sft_adapter, preference_pairs, scored_pairs
):
    validate_table(scored_pairs, PREFERENCE_PAIRS_SCHEMA, allow_extra_columns=False)
    assert scored_pairs.schema.metadata[b"schema_version"] == b"stylear.preference_pairs/1"
    digest = reference_digest(sft_adapter, model_cfg, 0.0)
    assert set(scored_pairs.column("reference_digest").to_pylist()) == {digest}

    live, live_grads, live_forwards, _ = dpo_step(
        model_cfg, sft_adapter, pq.read_table(preference_pairs), "live"
    )
    cached, cached_grads, cached_forwards, objective = dpo_step(
        model_cfg, sft_adapter, scored_pairs, "cached"
    )
    assert live.metrics["reference_cached"] == 0.0 and cached.metrics["reference_cached"] == 1.0
    assert live_forwards == 2 and cached_forwards == 1  # policy only: no reference pass
    assert abs(live.metrics["reward_margin"]) > 1e-3  # the policy differs from the reference
    assert cached.loss.item() == pytest.approx(live.loss.item(), rel=1e-5)
    # Scored one pair per forward, the stored values differ from the step's batched ones by float32
    # rounding of sums over every image token (about 1e-5 here), not more.
    assert cached.metrics["reward_margin"] == pytest.approx(live.metrics["reward_margin"], abs=1e-4)
    for a, b in zip(cached_grads, live_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    # No reference adapter was built, so none is digested as if it were frozen weights.
    names = [n for n, _ in objective.model.backbone.named_parameters()]
    assert not any(f".{REFERENCE_ADAPTER}." in n for n in names)
    assert "reference" not in objective.parameter_groups()


def test_with_noise_the_cached_policy_sees_the_stored_draw(
    model_cfg, sft_adapter, preference_pairs, scored_pairs
):
    noisy = ReferenceLogProbScorer(model_cfg, str(sft_adapter), 2.0, score_batch_size=3, device="cpu")(
        pq.read_table(preference_pairs)
    )
    assert reference_digest(sft_adapter, model_cfg, 2.0) != reference_digest(sft_adapter, model_cfg, 0.0)
    stored = np.asarray(noisy.column("reference_chosen_logp").to_pylist())
    noise_free = np.asarray(scored_pairs.column("reference_chosen_logp").to_pylist())
    assert np.abs(stored - noise_free).min() > 1e-3  # a draw moves each value far beyond rounding
    # The policy starts as the reference: only if it sees the same noisy style tokens as the stored
    # values is every reward 0 (fresh noise would make rewards of noise alone, ~1e-2 here). Scored
    # three pairs per forward, as the step runs them, the values agree to the last bit.
    result, _, _, _ = dpo_step(model_cfg, sft_adapter, noisy, "cached", noise=2.0, perturb=False)
    assert result.metrics["reward_margin"] == pytest.approx(0.0, abs=1e-7)
    assert result.loss.item() == pytest.approx(math.log(2), abs=1e-7)
    # Values scored at another strength are not used: auto falls back to the live reference.
    other, _, forwards, _ = dpo_step(model_cfg, sft_adapter, scored_pairs, "auto", noise=2.0)
    assert other.metrics["reference_cached"] == 0.0 and forwards == 2


def test_values_for_another_adapter_are_refused_or_scored_again(
    tmp_path, model_cfg, sft_adapter, preference_pairs, scored_pairs
):
    other = tiny_adapter(tmp_path / "other", model_cfg, perturb=("lora",), seed=2)
    pq.write_table(scored_pairs, tmp_path / "scored.parquet")
    assert reference_logps_state(
        tmp_path / "scored.parquet", reference_digest(sft_adapter, model_cfg, 0.0)
    ) == (
        "valid",
        "",
    )
    state, why = reference_logps_state(tmp_path / "scored.parquet", reference_digest(other, model_cfg, 0.0))
    assert state == "stale" and "noise strength" in why
    assert reference_logps_state(preference_pairs, reference_digest(other, model_cfg, 0.0))[0] == "missing"

    with pytest.raises(ValueError, match="another SFT adapter"):
        dpo_step(model_cfg, other, scored_pairs, "cached")
    live, _, _, _ = dpo_step(model_cfg, other, pq.read_table(preference_pairs), "live")
    auto, _, forwards, _ = dpo_step(model_cfg, other, scored_pairs, "auto")
    assert auto.metrics["reference_cached"] == 0.0 and forwards == 2
    assert auto.loss.item() == pytest.approx(live.loss.item(), rel=1e-6)

    # The stage decides before training: cached refuses, auto goes live, live never looks.
    for mode, expected in (("auto", "live"), ("live", "live")):
        cfg = load_config(
            DPOTrainConfig,
            None,
            [f"pairs={tmp_path / 'scored.parquet'}", f"sft_adapter={other}", f"dpo.reference_logps={mode}"],
        )
        assert resolve_reference_logps(cfg, model_cfg, str(other))[1] == expected
    cfg = load_config(
        DPOTrainConfig, None, [f"pairs={tmp_path / 'scored.parquet'}", "dpo.reference_logps=cached"]
    )
    with pytest.raises(ConfigError, match="precompute"):
        resolve_reference_logps(cfg, model_cfg, str(other))


def test_sampler_stores_the_reference_log_probs_of_its_pairs(model_cfg, sft_adapter):
    sampling = PreferenceSamplingConfig(num_samples=2, top_k=64, min_margin=-1.0)
    sampler = PreferencePairSampler(model_cfg, str(sft_adapter), sampling, device="cpu")
    requests = synthetic_style_requests(2, seed=5, size=model_cfg.image_size)
    batch = {k: np.array([r[k] for r in requests], dtype=object) for k in requests[0]}
    table = sampler(batch)
    validate_table(table, PREFERENCE_PAIRS_SCHEMA, allow_extra_columns=False)
    assert set(table.column("reference_digest").to_pylist()) == {
        reference_digest(sft_adapter, model_cfg, 0.0)
    }
    again = ReferenceLogProbScorer(model_cfg, str(sft_adapter), 0.0, device="cpu")(table)
    for column in ("reference_chosen_logp", "reference_rejected_logp"):
        assert table.column(column).to_pylist() == pytest.approx(again.column(column).to_pylist(), rel=1e-5)
    # chosen was sampled from this model; rejected too: both finite and negative sums of log-probs
    assert all(v < 0 for v in table.column("reference_chosen_logp").to_pylist())


@pytest.mark.usefixtures("ray_session")
def test_dpo_stage_precomputes_once_before_training(tmp_path, model_cfg, sft_adapter, preference_pairs):
    cfg = load_config(
        DPOTrainConfig,
        None,
        [
            f"output_dir={tmp_path}",
            f"sft_adapter={sft_adapter}",
            f"pairs={preference_pairs}",
            "dpo.reference_logps=precompute",
            "ray.num_workers=1",
        ],
    )
    path, mode = resolve_reference_logps(cfg, model_cfg, str(sft_adapter))
    assert mode == "cached" and path.startswith(str(tmp_path / "reference_logps"))
    # The Ray Data map keeps the rows and their order (a resumed run sees the same batches) and gives
    # what scoring in one process gives.
    table = pq.read_table(path)
    validate_table(table, PREFERENCE_PAIRS_SCHEMA)
    assert table.column("id").to_pylist() == pq.read_table(preference_pairs).column("id").to_pylist()
    assert reference_logps_state(path, reference_digest(sft_adapter, model_cfg, 0.0)) == ("valid", "")
    local = ReferenceLogProbScorer(model_cfg, str(sft_adapter), device="cpu")(pq.read_table(preference_pairs))
    for column in ("reference_chosen_logp", "reference_rejected_logp"):
        assert table.column(column).to_pylist() == pytest.approx(local.column(column).to_pylist(), rel=1e-6)
    # A rerun of the stage (a resume) finds the scored copy complete and reads it as is.
    stamps = {p: p.stat().st_mtime_ns for p in Path(path).rglob("*.parquet")}
    assert resolve_reference_logps(cfg, model_cfg, str(sft_adapter)) == (path, "cached")
    assert {p: p.stat().st_mtime_ns for p in Path(path).rglob("*.parquet")} == stamps


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_cached_dpo_run_has_the_losses_of_the_live_run(tmp_path, sft_adapter, preference_pairs, job_runner):
    common = (f"sft_adapter={sft_adapter}", f"pairs={preference_pairs}", "train.max_steps=3")
    summary = job_runner("train_dpo", tmp_path / "cached", *common, "dpo.reference_logps=precompute")
    job_runner("train_dpo", tmp_path / "live", *common, "dpo.reference_logps=live")
    assert summary["reference_logps"] == "cached"
    cached = read_metrics_log(tmp_path / "cached" / "train_dpo" / "metrics.jsonl")
    live = read_metrics_log(tmp_path / "live" / "train_dpo" / "metrics.jsonl")
    assert [r["reference_cached"] for r in cached] == [1.0] * 3
    assert [r["reference_cached"] for r in live] == [0.0] * 3
    # Step 1 runs the policy as initialised, the SFT adapter: against the stored reference, reward 0.
    assert cached[0]["reward_margin"] == pytest.approx(0.0, abs=1e-4)
    for a, b in zip(cached, live):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
        assert a["reward_margin"] == pytest.approx(b["reward_margin"], rel=1e-3, abs=1e-4)
    assert abs(cached[-1]["reward_margin"]) > 1e-2  # the policy moved: the comparison is not of zeros
    assert "digest/reference" not in cached[-1] and "digest/reference" in live[-1]


def test_step_time_benchmark_runs_one_forward_fewer_when_cached(capsys):
    from benchmarks.dpo_reference import main

    summary = main(["--rows", "4", "--steps", "2", "--warmup", "0"])
    results = summary["results"]
    assert results["live"]["backbone_forwards_per_step"] == 2
    assert results["cached"]["backbone_forwards_per_step"] == 1
    # Same pairs, same SFT start: the first losses agree (log 2: the policy is the reference).
    assert results["cached"]["first_loss"] == pytest.approx(results["live"]["first_loss"], abs=1e-5)
    assert summary["cached_over_live"] == pytest.approx(
        results["cached"]["step_s"] / results["live"]["step_s"]
    )
    assert "cached / live step time" in capsys.readouterr().out

"""The SFT job on real Ray Train + DeepSpeed (2 CPU workers, gloo): ZeRO-2 and ZeRO-3, restarts, export.

Each run checks that the loss falls, the resampler and LoRA changed while the base backbone, CLIP and
VQGAN are bit-identical to a freshly built model (SHA-256 digests over every parameter group), that
the step counter and the data position continue from the checkpoint after a failure, and that the
exported artefact reloads onto a fresh model with the in-training logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from stylear_core.adapters.io import load_adapter
from stylear_core.adapters.probe import verify_adapter
from stylear_core.runs import read_manifest
from stylear_core.training.checkpoint import read_train_state
from stylear_core.training.loop import group_digests
from stylear_core.training.metrics import read_metrics_log
from stylear_core.training.objectives import StyleSFTObjective

pytestmark = pytest.mark.usefixtures("ray_session")


def fresh_digests(model_cfg) -> dict[str, str]:
    objective = StyleSFTObjective(model_cfg)
    objective.setup(torch.device("cpu"), "fp32")
    return group_digests(objective.parameter_groups(), rank=0)


def check_trained_weights_and_export(out: Path, model_cfg, metrics: dict) -> None:
    fresh = fresh_digests(model_cfg)
    for frozen in ("base", "clip", "vqgan"):
        assert metrics[f"digest/{frozen}"] == fresh[frozen], f"{frozen} weights changed"
    for trained in ("lora", "resampler"):
        assert metrics[f"digest/{trained}"] != fresh[trained], f"{trained} weights did not change"
    adapter = out / "adapter"
    manifest = read_manifest(adapter)
    assert manifest["status"] == "complete" and manifest["format"] == "stylear.adapter/1"
    assert manifest["step"] == metrics["step"] and manifest["base_model"] == "random:tiny:seed0"
    assert manifest["digests"]["base"] == fresh["base"]
    model = StyleSFTObjective(model_cfg).build_model()
    assert verify_adapter(load_adapter(model, adapter), adapter) < 1e-5


def actor_logs(actor_class: str) -> list[str]:
    """The stdout and stderr files of this Ray session's actors of ``actor_class``."""
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    texts = [p.read_text(errors="replace") for p in logs.glob("worker-*") if p.suffix in (".out", ".err")]
    return [text for text in texts if f":actor_name:{actor_class}" in text]


def loss_fell(rows: list[dict]) -> bool:
    first = sum(r["loss"] for r in rows[:2]) / 2
    last = sum(r["loss"] for r in rows[-2:]) / 2
    return last < first - 0.1


def test_zero2_survives_an_injected_failure_and_resumes_at_the_checkpoint(
    tmp_path, token_shards, model_cfg, job_runner
):
    # Four files, read in an order shuffled by train.seed: the restarted attempt must read them in the
    # same order for the data position to mean the same rows.
    table = pq.read_table(next(token_shards.glob("*.parquet")))
    shards = tmp_path / "shards"
    shards.mkdir()
    for f in range(4):
        pq.write_table(table.slice(8 * f, 8), shards / f"part-{f:05d}.parquet")
    summary = job_runner(
        "train_style",
        tmp_path,
        f"data.token_shards={shards}",
        "data.synthetic_rows=0",
        "train.zero_stage=2",
        "train.max_steps=8",
        "train.checkpoint_every=2",
        "train.fail_at_step=3",
        "train.record_sample_ids=true",
        "ray.max_failures=1",
    )
    out = tmp_path / "train_style"
    rows = read_metrics_log(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9))
    # Steps 1-2 ran in the first attempt; it failed after step 3, before reporting it; the second
    # attempt resumed from the checkpoint at step 2, not from 0.
    assert [r["resumed_from"] for r in rows] == [0, 0, 2, 2, 2, 2, 2, 2]
    assert summary["steps"] == 8 and read_manifest(out)["status"] == "complete"
    # 16 rows per rank, 4 per step: epoch 0 is steps 1-4, epoch 1 steps 5-8. Rank 0 sees each of its
    # rows once per epoch, in the same order in both epochs, although epoch 0 was split by the restart.
    ids = [r["sample_ids"] for r in rows]
    epoch0, epoch1 = sum(ids[:4], []), sum(ids[4:], [])
    assert len(epoch0) == 16 and len(set(epoch0)) == 16 and epoch1 == epoch0
    assert loss_fell(rows), [r["loss"] for r in rows]
    assert rows[0]["lr"] < rows[1]["lr"] and rows[-1]["lr"] < rows[2]["lr"]  # warmup, then decay
    assert all(r["tokens_per_s"] > 0 for r in rows)
    check_trained_weights_and_export(out, model_cfg, rows[-1])
    final = Path(summary["checkpoint"])
    assert json.loads((final / "train_state.json").read_text())["step"] == 8
    shards = sorted(p.name for p in (final / "state").iterdir())
    assert (
        "zero_pp_rank_0_mp_rank_00_optim_states.pt" in shards
        and "zero_pp_rank_1_mp_rank_00_optim_states.pt" in shards
    )
    # The workers' logs hold the injected failure, not an echo of every report's rows; the data feeding
    # them draws no progress bars of its own (the training bar is the progress).
    workers, feeders = actor_logs("RayTrainWorker"), actor_logs("SplitCoordinator")
    assert any("InjectedFailure" in text for text in workers), len(workers)
    assert not any("Reporting training result" in text for text in workers)
    assert feeders and not any("row/s" in text or "Running Dataset" in text for text in feeders)


def test_zero3_killed_after_a_checkpoint_resumes_when_started_again(
    tmp_path, token_shards, model_cfg, job_runner
):
    args = [
        f"data.token_shards={token_shards}",
        "data.synthetic_rows=0",
        "train.zero_stage=3",
        "train.max_steps=6",
        "train.checkpoint_every=2",
        "train.fail_at_step=3",
        "ray.max_failures=0",
    ]
    with pytest.raises(Exception, match="fail_at_step"):
        job_runner("train_style", tmp_path, *args)
    out = tmp_path / "train_style"
    assert read_manifest(out) is None  # the stage did not complete
    saved = sorted(p for p in (out / "checkpoints" / "train_style").glob("checkpoint_*") if p.is_dir())
    assert [read_train_state(p).step for p in saved] == [2]

    summary = job_runner("train_style", tmp_path, *args)  # the same command again
    rows = read_metrics_log(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert [r["resumed_from"] for r in rows] == [0, 0, 2, 2, 2, 2]
    assert summary["steps"] == 6 and read_manifest(out)["status"] == "complete"
    assert loss_fell(rows), [r["loss"] for r in rows]
    check_trained_weights_and_export(out, model_cfg, rows[-1])

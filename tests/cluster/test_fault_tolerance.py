"""Fault tolerance on a multi-node ``ray.cluster_utils.Cluster``: node loss in training, actor crashes in curation.

Each scenario runs in its own process (``tests/cluster/fault_scenarios.py``) with its own cluster on
127.0.0.1 -- a head and two worker nodes with small object stores -- so it never meets the test
session's ``ray.init``; the tests assert on what the scenario observed and left on disk.

Node loss takes about three minutes on a 2-core machine (three simulated nodes, a worker group
restarted on the replacement node), so it runs with ``make test-all``; the default run keeps training's
own fault paths (``tests/training/test_train_style.py``: an injected worker failure that Ray Train
restarts from the checkpoint, and a killed ZeRO-3 run resumed by starting it again).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cluster.local import project_env

SCENARIOS = Path(__file__).resolve().with_name("fault_scenarios.py")
REPO = Path(__file__).resolve().parents[2]


def run_scenario(name: str, work: Path, timeout_s: float = 900) -> dict:
    """Run one scenario process; its ``result.json`` (the scenario's exception, if any, fails the test)."""
    env = {**os.environ, **project_env(), "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, str(SCENARIOS), name, str(work)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s,
    )  # fmt: skip
    result_file = work / "result.json"
    assert result_file.is_file(), f"scenario wrote no result (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    result = json.loads(result_file.read_text())
    assert "exception" not in result, result["exception"]
    return result


@pytest.mark.slow
def test_training_survives_losing_a_node_and_resumes_from_its_checkpoint(tmp_path):
    r = run_scenario("training_node_loss", tmp_path)
    worker_nodes = set(r["worker_node_ids"])
    # The worker group was spread over both worker nodes (one 1.5-CPU worker fits per 2-CPU node).
    assert any(set(nodes) == worker_nodes for nodes in r["placements"]), r["placements"]
    assert r["removed_node"] in worker_nodes and r.get("replacement_added")
    assert r["driver_exit"] == 0
    steps = [m["step"] for m in r["metrics"]]
    assert steps == list(range(1, 11))  # every step once
    resumed = {m["resumed_from"] for m in r["metrics"]}
    # The restarted group resumed from a checkpoint (taken every 2 steps), not from step 0.
    assert max(resumed) >= 2 and max(resumed) % 2 == 0
    assert [m["resumed_from"] for m in r["metrics"]][: max(resumed)] == [0] * max(resumed)
    assert r["manifest"]["status"] == "complete" and r["manifest"]["summary"]["steps"] == 10
    assert {"adapter_model.safetensors", "resampler.safetensors", "manifest.json"} <= set(r["adapter_files"])


def _ids(directory: Path, stages: set[str] | None = None) -> list[str]:
    """Every id in a curation table directory (only rows of ``stages`` for ``errors/``), duplicates kept."""
    files = [str(p) for p in sorted(directory.glob("*.parquet")) if not p.name.startswith((".", "_"))]
    if not files:
        return []
    table = pq.ParquetDataset(files).read(columns=["id", "stage"] if stages else ["id"])
    ids = table.column("id").to_pylist()
    if stages:
        return [i for i, s in zip(ids, table.column("stage").to_pylist()) if s in stages]
    return ids


def test_curation_survives_actor_crashes_without_losing_or_duplicating_rows(tmp_path):
    from stylear_core.data.synthetic import SyntheticStyleSet

    r = run_scenario("curation_actor_crash", tmp_path)
    assert r["crashed"] == ["stylize", "tokenize"]  # both injected crashes happened
    assert r["summary"]["failed"] == 0, r["summary"]["errors_by_stage"]  # a crash is retried, not a bad row
    out = tmp_path / "curate"
    requests = [row["id"] for row in SyntheticStyleSet(seed=0, size=64).stylization_requests(8, num_styles=2)]
    stylized = _ids(out / "stylized")
    rejected = _ids(out / "errors", {"read", "stylize", "clip_filter"})
    # Every request is in exactly one place: stylized, or an error row; none twice, none missing.
    assert sorted(stylized + rejected) == sorted(requests)
    curated, tokens = _ids(out / "curated"), _ids(out / "tokens")
    raw = [row["id"] for row in SyntheticStyleSet(seed=0, size=64).raw_pairs(12)]
    assert len(curated) == len(set(curated)) and set(curated) <= set(raw) | set(stylized)
    assert set(curated) & set(stylized) and set(curated) & set(raw)  # the mix holds both kinds
    assert sorted(tokens + _ids(out / "errors", {"tokenize"})) == sorted(curated)

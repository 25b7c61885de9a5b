"""The real thing: ``ray start --head`` on loopback, ``ray job submit`` of the tiny pipeline, then serving it.

One private cluster (own ports and temp dir) for the module. The pipeline runs exactly as a user
submits it -- ``ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python -m
jobs.pipeline --config jobs/configs/pipeline/tiny.yaml`` -- with overrides that shrink every stage;
the demo's serving step then deploys the exported adapter on the same cluster and queries it over
HTTP. Only the processes started here are stopped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from cluster.demo import start_local_cluster, submit_job, wait_for_job
from cluster.local import REPO_ROOT, project_env
from stylear_core.config import load_config
from stylear_core.data.schemas import schema_version
from stylear_core.runs import read_manifest

STAGES = ["curate", "train_style", "make_preferences", "train_dpo", "evaluate", "export"]
# Every stage at its smallest: the fixed costs (actor and worker start-up) dominate anyway.
SHRINK = {
    "curate": ["inputs.synthetic_raw=12", "inputs.synthetic_requests=4", "inputs.synthetic_styles=2", "progress_bars=false"],
    "train_style": ["train.max_steps=4", "train.checkpoint_every=2", "train.grad_accum_steps=1", "data.synthetic_rows=0"],
    "make_preferences": ["synthetic_requests=4", "sampling.num_samples=2"],  # >= 4 pairs: 2 ranks x 2
    "train_dpo": ["train.max_steps=2", "train.checkpoint_every=2"],
    "evaluate": ["pairs.count=2", "pairs.num_styles=2", "sampling.samples_per_pair=1"],
    "export": [],
}  # fmt: skip
JOB_TIMEOUT_S = 1500


def pipeline_overrides(run_dir: Path) -> list[str]:
    """``key=value`` arguments of ``jobs.pipeline``: the run dir and each stage's shrinking overrides."""
    out = [f"run_dir={run_dir}"]
    for stage, overrides in SHRINK.items():
        out.append(f"stages.{stage}.overrides=[{', '.join(overrides)}]")
    return out


@pytest.fixture(scope="module")
def submitted(tmp_path_factory):
    """The pipeline submitted to a private cluster and its export served: ``(run_dir, status, logs,
    demo, threads)``, where ``threads`` maps reserved entrypoint CPUs to what a job of them logs."""
    run_dir = tmp_path_factory.mktemp("submitted") / "run"
    env = {**os.environ, **project_env()}
    env.pop("RAY_ADDRESS", None)
    submission_id = f"stylear-test-{os.getpid()}"
    cluster = start_local_cluster(num_cpus=4)
    try:
        entrypoint = ["python", "-m", "jobs.pipeline", "--config", "jobs/configs/pipeline/tiny.yaml"]
        submit_job(cluster, [*entrypoint, *pipeline_overrides(run_dir)], submission_id)
        status = wait_for_job(cluster, submission_id, JOB_TIMEOUT_S)
        from ray.job_submission import JobSubmissionClient

        logs = JobSubmissionClient(cluster.dashboard_url).get_job_logs(submission_id)
        demo = None
        if status == "SUCCEEDED":
            serve = [
                sys.executable, "-m", "cluster.demo", "--attach", cluster.address, "--skip-pipeline",
                "--run-dir", str(run_dir), "--requests", "1",
            ]  # fmt: skip
            demo = subprocess.run(serve, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
        threads = {cpus: entrypoint_threads(cluster, cpus) for cpus in (0, 2)}
    finally:
        cluster.stop()
    yield run_dir, status, logs, demo, threads


def entrypoint_threads(cluster, cpus: int) -> str:
    """What a stage logs of its torch threads when submitted with ``cpus`` reserved (0: none)."""
    from ray.job_submission import JobSubmissionClient

    submission_id = f"stylear-threads-{cpus}-{os.getpid()}"
    note = "from stylear_core.stages import threads_note; print(threads_note())"
    submit_job(cluster, ["python", "-c", note], submission_id, entrypoint_cpus=cpus)
    assert wait_for_job(cluster, submission_id, 300) == "SUCCEEDED"
    return JobSubmissionClient(cluster.dashboard_url).get_job_logs(submission_id)


def test_the_submitted_pipeline_succeeds_and_completes_every_stage(submitted):
    run_dir, status, logs, _, _ = submitted
    assert status == "SUCCEEDED", logs[-6000:]
    pipeline = read_manifest(run_dir)
    assert pipeline["status"] == "complete" and set(pipeline["stages"]) == set(STAGES)
    for stage in STAGES:
        assert read_manifest(run_dir / stage)["status"] == "complete", stage
        assert f"[pipeline] {stage}: done" in logs


def test_the_stages_leave_their_documented_outputs(submitted):
    run_dir, status, _, _, _ = submitted
    assert status == "SUCCEEDED"
    for table, version in (("curated", "stylear.curated/2"), ("tokens", "stylear.token_shards/2")):
        files = sorted((run_dir / "curate" / table).glob("*.parquet"))
        assert files and schema_version(pq.read_schema(files[0])) == version
    assert pq.read_table(run_dir / "make_preferences" / "pairs").num_rows > 0
    for stage in ("train_style", "train_dpo"):
        assert (run_dir / stage / "metrics.jsonl").is_file()
        assert read_manifest(run_dir / stage / "adapter")["format"] == "stylear.adapter/1"
    metrics = pq.read_table(run_dir / "evaluate" / "metrics.parquet")
    assert metrics.column("variant").to_pylist() == ["base", "sft", "dpo"]
    exported = read_manifest(run_dir / "export")["summary"]
    adapter = Path(exported["adapter"])
    assert (
        adapter.parent == run_dir / "export" / "adapters"
        and (adapter / "adapter_model.safetensors").is_file()
    )
    assert exported["served_parity"] <= 1e-4
    from serving.config import ServingConfig

    serving = load_config(ServingConfig, run_dir / "export" / "serving.yaml")
    assert serving.adapters_root == str(adapter.parent) and serving.model.image_size == 64


def test_the_exported_adapter_is_served_over_http_and_reported(submitted):
    run_dir, status, _, demo, _ = submitted
    assert status == "SUCCEEDED" and demo is not None
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    served = json.loads((run_dir / "served" / "responses.json").read_text())
    assert served["health"] == 200 and served["adapters"] == ["stylear-tiny"]
    assert {r["adapter"] for r in served["requests"]} == {"stylear-tiny", None}
    for request in served["requests"]:
        assert request["status"] == 200
        with Image.open(run_dir / "served" / request["image"]) as image:
            assert image.size == (64, 64)
    assert served["stats"]["adapter_loads"] == {"stylear-tiny": 1}
    report = (run_dir / "report.html").read_text()
    assert "Served over HTTP" in report and "Style evaluation" in report and "curves_train_dpo.png" in report


def test_reserved_entrypoint_cpus_become_the_stages_torch_threads(submitted):
    # Ray starts an entrypoint that reserves no CPUs with OMP_NUM_THREADS=1: a stage that trains in its
    # own process (the miniature world) then uses one core, and its log says how to reserve more.
    threads = submitted[4]
    assert "torch threads in this process: 1 of" in threads[0] and "--entrypoint-num-cpus" in threads[0]
    assert "torch threads in this process: 2 of" in threads[2], threads[2]

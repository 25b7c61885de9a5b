"""Fault scenarios on a private multi-node Ray cluster, run as a separate process by test_fault_tolerance.py.

    python tests/cluster/fault_scenarios.py {training_node_loss|curation_actor_crash} WORK_DIR

Each scenario starts its own ``ray.cluster_utils.Cluster`` on 127.0.0.1 (a head and two worker nodes,
small object stores, explicit ports and temp dir), runs a real job against it while injecting a fault,
writes what it observed to ``WORK_DIR/result.json`` and shuts the cluster down. A process of its own
keeps these clusters apart from the test session's ``ray.init`` (one Ray connection per process).

* ``training_node_loss``: the SFT job (``jobs.train_style``) on two Ray Train workers that can only be
  placed one per worker node (each worker asks for 1.5 CPUs, each worker node has 2, the head 1).
  Once the first checkpoint (step 2) is registered and training has moved past it, one worker node
  is removed and a replacement added; ``FailureConfig`` restarts the worker group, which resumes
  from the checkpoint.
* ``curation_actor_crash``: the curation job (``jobs.curate``) where the first call of the stylizer
  actor and of the tokenizer actor, anywhere in the cluster, kills its process (``os._exit``); Ray
  Data restarts the actors and retries the batches.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from cluster.local import apply_project_env, free_port  # noqa: E402
from stylear_core.ray_connection import short_temp_dir  # noqa: E402

OBJECT_STORE_BYTES = 100 * 1024 * 1024


def node_args(temp_dir: str, **extra) -> dict:
    """Ray node arguments on loopback with ports of their own (nothing shared with other clusters)."""
    return {
        "node_ip_address": "127.0.0.1",
        "object_store_memory": OBJECT_STORE_BYTES,
        "include_dashboard": False,
        "dashboard_agent_listen_port": free_port(),
        "metrics_export_port": free_port(),
        "runtime_env_agent_port": free_port(),
        "temp_dir": temp_dir,
        **extra,
    }


def start_cluster(head_cpus: int, worker_cpus: int, workers: int = 2):
    """A head (``head_cpus``) and ``workers`` worker nodes of ``worker_cpus``; RAY_ADDRESS points at it so
    every process of this scenario (and Ray's own helpers) attaches here and nowhere else."""
    from ray.cluster_utils import Cluster

    temp_dir = short_temp_dir("sar-f-")
    # Cluster records the head's address in the default Ray temp dir (<RAY_TMPDIR or TMPDIR>/ray), which a
    # fresh machine does not have; point that record at this scenario's own dir, so it exists and no
    # later `ray_address: auto` on this machine picks up this short-lived cluster.
    os.environ["RAY_TMPDIR"] = temp_dir
    os.makedirs(os.path.join(temp_dir, "ray"), exist_ok=True)
    port = free_port()
    os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    # Worker processes start slowly on a loaded 2-core machine (torch + DeepSpeed imports): give a
    # restarted Ray Train worker group more than the default minute to come up.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "600"
    cluster = Cluster(
        initialize_head=True,
        head_node_args=node_args(temp_dir, num_cpus=head_cpus, gcs_server_port=port),
    )
    nodes = [cluster.add_node(**node_args(temp_dir, num_cpus=worker_cpus)) for _ in range(workers)]
    cluster.wait_for_nodes()
    return cluster, nodes, temp_dir


def wait_for(predicate, timeout_s: float, every_s: float = 0.2):
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout_s`` passes (None)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    return None


def training_node_loss(work: Path, cluster, workers: list) -> dict:
    """Run the SFT job across both worker nodes, kill one node after the first checkpoint, report what happened.

    The job runs as its own driver process (as ``ray job submit`` would run it) while this process
    operates the cluster: it watches the checkpoint storage, records where the worker group's
    placement group put its bundles, removes that node and adds a replacement.
    """
    import subprocess

    import ray

    storage, out = work / "storage", work / "train_style"
    observed: dict = {"placements": []}
    command = [
        sys.executable, "-m", "jobs.train_style",
        "--config", str(REPO / "jobs/configs/train_style/tiny.yaml"),
        f"run_dir={work}", f"output_dir={out}", f"ray_address={cluster.address}",
        f"data.token_shards={work / 'shards'}", "data.synthetic_rows=16", "data.cache=false",
        "train.max_steps=10", "train.checkpoint_every=2", "train.grad_accum_steps=1",
        "ray.num_workers=2", "ray.worker.cpus=1.5", "ray.max_failures=2",
        f"ray.storage_path={storage}", "ray.name=train_style",
    ]  # fmt: skip
    with open(work / "driver.log", "wb") as log:
        driver = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            # A checkpoint counts once the controller has registered its report; the metrics log is
            # written by the controller after that, so a logged step past the first checkpoint means
            # the restarted group must resume from it.
            from stylear_core.training.metrics import read_metrics_log

            def past_first_checkpoint() -> bool:
                return any(r.get("step", 0) > 2 for r in read_metrics_log(out / "metrics.jsonl"))

            first = wait_for(past_first_checkpoint, timeout_s=900, every_s=0.1)
            observed["checkpoints_at_kill"] = [
                p.name for p in sorted((storage / "train_style").glob("checkpoint_*"))
            ]
            for pg in ray.util.placement_group_table().values():
                if pg.get("state") == "CREATED":
                    observed["placements"].append(sorted(set(pg["bundles_to_node_id"].values())))
            observed["worker_node_ids"] = [n.node_id for n in workers]
            if driver.poll() is None and first:
                observed["removed_node"] = workers[1].node_id
                cluster.remove_node(workers[1], allow_graceful=False)
                # Capacity for the restarted worker group: a fresh node in place of the lost one.
                cluster.add_node(**node_args(cluster.head_node.get_temp_dir_path(), num_cpus=2))
                observed["replacement_added"] = True
            observed["driver_exit"] = driver.wait(timeout=900)
        finally:
            if driver.poll() is None:
                driver.kill()
    from stylear_core.runs import read_manifest

    observed["manifest"] = read_manifest(out)
    observed["metrics"] = [
        {k: r.get(k) for k in ("step", "resumed_from", "loss")}
        for r in read_metrics_log(out / "metrics.jsonl")
    ]
    observed["adapter_files"] = (
        sorted(p.name for p in (out / "adapter").iterdir()) if (out / "adapter").is_dir() else []
    )
    return observed


def curation_actor_crash(work: Path, cluster, workers: list) -> dict:
    """Run the curation job with a one-time process crash in the stylizer and the tokenizer actors."""
    import stylear_core.curation.pipeline as curation
    from stylear_core.curation.stages import StylizeActor
    from stylear_core.curation.tokenize import TokenizeActor

    markers = work / "crashes"
    markers.mkdir(parents=True, exist_ok=True)

    def crash_once(name: str) -> None:
        # O_EXCL: exactly one call in the whole cluster creates the marker, and that process dies.
        try:
            fd = os.open(markers / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os._exit(1)

    class CrashOnceStylizeActor(StylizeActor):
        def __call__(self, batch):
            crash_once("stylize")
            return super().__call__(batch)

    class CrashOnceTokenizeActor(TokenizeActor):
        def __call__(self, batch):
            crash_once("tokenize")
            return super().__call__(batch)

    curation.StylizeActor = CrashOnceStylizeActor
    curation.TokenizeActor = CrashOnceTokenizeActor
    import jobs.curate as job

    out = work / "curate"
    summary = job.main(
        [
            "--config", str(REPO / "jobs/configs/curate/tiny.yaml"),
            f"run_dir={work}", f"output_dir={out}",
            "inputs.synthetic_raw=12", "inputs.synthetic_requests=8", "inputs.synthetic_styles=2",
            "stylize_pool.batch_size=2", "tokenize_pool.batch_size=4", "rows_per_file=4",
            "progress_bars=false",
        ]
    )  # fmt: skip
    return {
        "summary": summary,
        "crashed": sorted(p.name for p in markers.iterdir()),
        "crash_pids": {p.name: p.read_text() for p in markers.iterdir()},
    }


SCENARIOS = {"training_node_loss": training_node_loss, "curation_actor_crash": curation_actor_crash}


def main() -> None:
    """``fault_scenarios.py SCENARIO WORK_DIR``: run it on a fresh cluster and write ``WORK_DIR/result.json``
    (with ``exception`` set when the scenario raised)."""
    name, work = sys.argv[1], Path(sys.argv[2]).resolve()
    apply_project_env()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    work.mkdir(parents=True, exist_ok=True)
    import ray

    cluster, workers, _ = start_cluster(head_cpus=1, worker_cpus=2)
    result: dict = {}
    try:
        ray.init(address=cluster.address)
        result = SCENARIOS[name](work, cluster, workers)
    except BaseException:
        result["exception"] = traceback.format_exc()
    finally:
        (work / "result.json").write_text(json.dumps(result, indent=2, default=str))
        ray.shutdown()
        cluster.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: Ray's exit hooks for nodes already removed can block it.
    os._exit(0)


if __name__ == "__main__":
    main()

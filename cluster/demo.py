"""The tiny end-to-end demo: a private local Ray cluster, the pipeline submitted as a Ray job.

Starts a loopback Ray head (own ports and temp dir), submits
``python -m jobs.pipeline --config jobs/configs/pipeline/tiny.yaml`` with ``ray job submit``
exactly as a user would against a real cluster, streams its logs, and stops what it started.
Outputs land in ``runs/demo`` (override with ``--run-dir``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from cluster.local import REPO_ROOT, LocalRayCluster, project_env


def submit(cluster: LocalRayCluster, entrypoint: list[str], timeout_s: float) -> int:
    """``ray job submit`` the entrypoint with the repo as working dir; returns 0 when the job SUCCEEDED.

    The head answers HTTP before its job agent is up (slow on a busy machine), so the submission
    itself is retried until the agent takes it; the job is then followed to its end.
    """
    ray_bin = str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, **project_env()}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    job_id = f"stylear-demo-{int(time.time())}"
    address = f"--address={cluster.dashboard_url}"
    cmd = [
        ray_bin, "job", "submit", address, "--no-wait", f"--submission-id={job_id}",
        "--working-dir=.", "--runtime-env=cluster/runtime_env.yaml", "--", *entrypoint,
    ]  # fmt: skip
    deadline = time.time() + 600  # a loaded 2-core machine can take minutes
    while subprocess.run(cmd, cwd=REPO_ROOT, env=env).returncode != 0:
        if time.time() > deadline:
            return 1
        time.sleep(5)
    subprocess.run([ray_bin, "job", "logs", address, "--follow", job_id], env=env, timeout=timeout_s)
    status = subprocess.run(
        [ray_bin, "job", "status", address, job_id], env=env, capture_output=True, text=True
    ).stdout
    print(status.strip().splitlines()[-1] if status.strip() else "no job status", flush=True)
    return 0 if "SUCCEEDED" in status else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="jobs/configs/pipeline/tiny.yaml")
    parser.add_argument("--run-dir", default=str(REPO_ROOT / "runs" / "demo"))
    parser.add_argument("--num-cpus", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args(argv)
    t0 = time.time()
    with LocalRayCluster(num_cpus=args.num_cpus) as cluster:
        print(f"[demo] Ray head at {cluster.address}, dashboard {cluster.dashboard_url}", flush=True)
        rc = submit(
            cluster,
            [
                "python",
                "-m",
                "jobs.pipeline",
                "--config",
                args.config,
                f"run_dir={Path(args.run_dir).resolve()}",
            ],
            args.timeout,
        )
    print(
        f"[demo] pipeline job exited {rc} after {time.time() - t0:.0f}s; outputs in {args.run_dir}",
        flush=True,
    )
    return rc


if __name__ == "__main__":
    sys.exit(main())

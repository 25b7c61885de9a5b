"""Stages attach to the cluster they are told about, reach a loopback head on loopback, and fail fast otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.local import LocalRayCluster, free_port, project_env
from stylear_core.ray_connection import (
    RayConnectionError,
    RayTarget,
    probe,
    ray_address_file,
    resolve_ray_address,
)

REPO = Path(__file__).resolve().parents[1]
CURATE = str(REPO / "jobs" / "configs" / "curate" / "tiny.yaml")


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No RAY_ADDRESS and an empty temp dir: what a fresh machine's shell has."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    return tmp_path


def test_auto_prefers_ray_address_then_the_recorded_head(clean_env, monkeypatch):
    with pytest.raises(RayConnectionError, match="ray_address=local"):
        resolve_ray_address("auto")  # nothing to attach to: say what to do, do not guess
    recorded = ray_address_file()
    assert recorded == clean_env / "ray" / "ray_current_cluster"
    recorded.parent.mkdir()
    recorded.write_text("127.0.0.1:6380")
    target = resolve_ray_address("auto")
    assert (target.address, str(recorded) in target.source) == ("127.0.0.1:6380", True)
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    assert resolve_ray_address("auto") == RayTarget("10.1.2.3:6379", "RAY_ADDRESS")
    assert resolve_ray_address("127.0.0.1:7000").source == "the stage config"  # explicit wins over both
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    with pytest.raises(RayConnectionError, match="dashboard URL"):
        resolve_ray_address("auto")


def test_targets_parse_and_a_dead_address_fails_within_seconds():
    assert RayTarget("127.0.0.1:6379", "x").is_loopback
    assert not RayTarget("10.0.0.5:6379", "x").is_loopback
    assert RayTarget("ray://head:10001", "x").host_port is None
    with pytest.raises(RayConnectionError, match="not host:port"):
        RayTarget("head-without-port", "x").host_port  # noqa: B018
    dead = RayTarget(f"127.0.0.1:{free_port()}", "RAY_ADDRESS")
    started = time.monotonic()
    with pytest.raises(RayConnectionError, match=f"{dead.address} \\(from RAY_ADDRESS\\) does not answer"):
        probe(dead, timeout_s=2.0)
    assert time.monotonic() - started < 3.0


def _job_env(**extra: str) -> dict[str, str]:
    # A user's shell: the project's offline settings, but not the switch that keeps Ray on loopback.
    env = {**os.environ, **project_env(), **extra}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    return env


def test_stage_by_hand_against_a_stale_address_fails_fast_and_says_so(tmp_path):
    stale = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "jobs.curate", "--config", CURATE, f"run_dir={tmp_path}"],
        cwd=REPO, env=_job_env(RAY_ADDRESS=stale, TMPDIR=str(tmp_path)),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert f"the Ray cluster at {stale} (from RAY_ADDRESS) does not answer" in done.stderr
    assert time.monotonic() - started < 60  # imports dominate; the probe itself gives up after 5 s


def test_stage_by_hand_attaches_to_a_loopback_head(tmp_path):
    """Before: Ray rewrote 127.0.0.1 to the interface address and the driver hung waiting for the GCS."""
    with LocalRayCluster(num_cpus=2) as head:
        done = subprocess.run(
            [
                sys.executable, "-m", "jobs.curate", "--config", CURATE,
                f"run_dir={tmp_path}", f"output_dir={tmp_path / 'curate'}", "progress_bars=false",
                "inputs.synthetic_raw=6", "inputs.synthetic_requests=2", "inputs.synthetic_styles=1",
            ],
            cwd=REPO, env=_job_env(RAY_ADDRESS=head.address, TMPDIR=str(tmp_path)),
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"[curate] connected to {head.address} (from RAY_ADDRESS): 1 node(s), 2 CPU" in done.stdout
    assert (tmp_path / "curate" / "manifest.json").is_file()

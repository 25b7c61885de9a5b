"""Start and stop a private single-node Ray cluster on loopback (for the demo, tests and stages run by hand).

Each cluster gets its own temp dir and ports and is stopped by the process it started,
never by a broad ``ray stop``, so it cannot disturb other clusters on the same machine.

    python -m cluster.local --num-cpus 2     # prints RAY_ADDRESS=127.0.0.1:PORT; Ctrl-C or SIGTERM stops it
    RAY_ADDRESS=127.0.0.1:PORT python -m jobs.curate --config jobs/configs/curate/tiny.yaml
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from stylear_core.ray_connection import short_temp_dir

REPO_ROOT = Path(__file__).resolve().parents[1]


def interpreter_first_path() -> str:
    """``PATH`` with this interpreter's ``bin`` directory first, so every process of the project finds the
    tools its packages installed rather than the system's. Torch builds DeepSpeed's CPU op with whichever
    ``ninja`` comes first on ``PATH``; the venv's (1.13) and the system's (1.11) record build commands
    under different hashes, so each rebuilt the op the other had built (about 45 s of both cores, several
    times per test run, as Ray workers of the tests' session and of submitted jobs took turns)."""
    bin_dir = str(Path(sys.executable).parent)
    rest = [part for part in os.environ.get("PATH", "").split(os.pathsep) if part and part != bin_dir]
    return os.pathsep.join([bin_dir, *rest])


def project_env() -> dict[str, str]:
    """Environment every local process of the project runs with: offline hubs, loopback Ray, no auth."""
    cache = REPO_ROOT / ".cache"
    return {
        "PATH": interpreter_first_path(),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "RAY_AUTH_MODE": "disabled",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DEDUP_LOGS": "0",
        "TORCH_EXTENSIONS_DIR": str(cache / "torch_extensions"),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p),
    }


def apply_project_env() -> None:
    """Set :func:`project_env` in this process (keeping values the user already set, except the paths)."""
    for k, v in project_env().items():
        if k in ("PATH", "PYTHONPATH") or k not in os.environ:
            os.environ[k] = v


# Servers get ports below Linux's ephemeral range (32768-60999 by default), from which the kernel picks the
# local port of every outgoing connection: a port found free there can be taken by some client socket
# before the server binds it (a Serve proxy once failed so, "Failed to bind to address").
SERVER_PORTS = range(20000, 32000)


def free_port() -> int:
    """A port of :data:`SERVER_PORTS` that nothing holds on 127.0.0.1 (picked at random, tried by binding)."""
    pick = random.SystemRandom()
    for _ in range(200):
        port = pick.choice(SERVER_PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in {SERVER_PORTS.start}-{SERVER_PORTS.stop - 1} after 200 tries")


@dataclass
class LocalRayCluster:
    """A ``ray start --head --block`` process we own; ``address`` for drivers, ``dashboard_url`` for jobs."""

    num_cpus: int = 2
    object_store_mb: int = 512
    resources: dict[str, float] = field(default_factory=dict)
    temp_dir: Path | None = None
    proc: subprocess.Popen | None = None
    gcs_port: int = 0
    dashboard_port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, timeout_s: float = 120.0) -> LocalRayCluster:
        import json

        self.temp_dir = Path(self.temp_dir or short_temp_dir("sar-ray-"))
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        # Worker ports below SERVER_PORTS, where free_port() picks the others: the ranges of two clusters
        # may overlap (Ray skips ports in use), but never this cluster's own ports.
        workers = 10000 + self.gcs_port % 9000
        ray_bin = Path(sys.executable).with_name("ray")
        cmd = [
            str(ray_bin), "start", "--head", "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={self.gcs_port}",
            f"--dashboard-port={self.dashboard_port}",
            "--dashboard-host=127.0.0.1",
            "--include-dashboard=true",
            f"--num-cpus={self.num_cpus}",
            f"--object-store-memory={self.object_store_mb * 1024 * 1024}",
            f"--temp-dir={self.temp_dir}",
            f"--ray-client-server-port={free_port()}",
            # Ray's fixed defaults (agent 52365, ...) clash with any other Ray on the machine: the job
            # agent then never registers and `ray job submit` answers "No available agent".
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--min-worker-port={workers}",
            f"--max-worker-port={workers + 400}",
        ]  # fmt: skip
        if self.resources:
            cmd.append(f"--resources={json.dumps(self.resources)}")
        env = {**os.environ, **project_env()}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        log = open(self.temp_dir / "head.log", "wb")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"ray start exited with {self.proc.returncode}; see {self.temp_dir / 'head.log'}"
                )
            try:
                import urllib.request

                urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2).read()
                return self
            except OSError:
                time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"Ray head did not come up in {timeout_s:.0f}s; see {self.temp_dir / 'head.log'}")

    def stop(self) -> None:
        """Stop the head and everything it started (its own process group)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> LocalRayCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    """Run a loopback head until Ctrl-C or SIGTERM, printing the ``RAY_ADDRESS`` stages use to attach to it."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cluster.local", description=main.__doc__)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--object-store-mb", type=int, default=1024)
    args = parser.parse_args(argv)
    stop = False

    def request_stop(*_) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    with LocalRayCluster(num_cpus=args.num_cpus, object_store_mb=args.object_store_mb) as cluster:
        print(f"RAY_ADDRESS={cluster.address}", flush=True)
        print(f"dashboard (ray job submit --address): {cluster.dashboard_url}; Ctrl-C stops it", flush=True)
        while not stop and cluster.proc.poll() is None:
            time.sleep(0.5)


if __name__ == "__main__":
    main()

"""`python -m serving`: the serve config's autoscaling policy on a private local Ray instance, and a clean stop.

The subprocess test starts the tiny service, loads it until the autoscaler adds a second model
replica, then stops it with SIGTERM (what docker, systemd and Kubernetes send) and checks that no
process of its Ray instance outlives it.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image

from cluster.local import free_port
from serving.__main__ import (
    INGRESS,
    MODEL,
    deployment_options,
    read_serve_config,
    serve_config_deployments,
)
from serving.app import serving_config

REPO = Path(__file__).resolve().parents[2]


def _stat(pid: int) -> tuple[int, str, str] | None:
    """(parent pid, state, start time) of a live process, else None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), fields[0], fields[19]


def process_tree(root: int) -> dict[int, str]:
    """``root`` and all its descendants: pid -> start time (so a reused pid is not mistaken for one of them)."""
    parents: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            parents[int(entry)] = (st[0], st[2])
    tree, grew = {root}, True
    while grew:
        grew = False
        for pid, (ppid, _) in parents.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return {pid: parents[pid][1] for pid in tree if pid in parents}


def still_running(tree: dict[int, str]) -> list[int]:
    """The processes of ``tree`` that are still alive (zombies count as gone)."""
    alive = []
    for pid, started in tree.items():
        st = _stat(pid)
        if st is not None and st[2] == started and st[1] != "Z":
            alive.append(pid)
    return alive


def mentions(path: str) -> list[int]:
    """Processes whose command line names ``path`` (Ray's own processes name their session dir)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if path in Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry))
            except OSError:
                pass
    return found


class LocalService:
    """``python -m serving`` in a subprocess (own session), its output in a file, killed whole on failure."""

    def __init__(self, log: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "serving", "--port", str(self.port), "--num-cpus", "3", *args]
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                cmd,
                cwd=REPO,
                env=dict(os.environ),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.tree: dict[int, str] = {}

    def wait_healthy(self, timeout_s: float = 240) -> None:
        deadline = time.time() + timeout_s
        while True:
            assert self.proc.poll() is None, (
                f"python -m serving exited early:\n{self.log.read_text()[-3000:]}"
            )
            try:
                if httpx.get(f"{self.url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "the service did not come up"
            time.sleep(1)
        self.tree = process_tree(self.proc.pid)

    def ray_dir(self, timeout_s: float = 60) -> str:
        """The Ray temp dir the service prints once ``serve.run`` returns (a moment after /healthz answers)."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            for line in self.log.read_text().splitlines():
                if "Ray in " in line:
                    return line.split("Ray in ", 1)[1].split(")", 1)[0]
            time.sleep(0.5)
        raise AssertionError("the service did not say where its Ray instance lives")

    def kill_all(self) -> None:
        for pid in still_running(self.tree or {self.proc.pid: ""}):
            os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self, sig: int) -> None:
        """Send ``sig``; assert exit status 0 and that not one process of the service's Ray is left."""
        tree = process_tree(self.proc.pid)
        assert len(tree) >= 8, tree  # the driver, GCS, raylet, agents, Serve actors, replicas
        self.tree.update(tree)
        ray_dir = self.ray_dir()
        base = tempfile.gettempdir()  # TMPDIR, unless too long for Ray's socket paths (then /tmp)
        assert Path(ray_dir).parent == Path(base if len(base) <= 40 else "/tmp"), ray_dir
        self.proc.send_signal(sig)
        assert self.proc.wait(timeout=120) == 0
        deadline = time.time() + 15  # Ray reaps its processes asynchronously after the driver's shutdown
        while (left := still_running(self.tree) + mentions(ray_dir)) and time.time() < deadline:
            time.sleep(0.5)
        assert not left, f"left running after {signal.Signals(sig).name}: {left}"


def test_deployment_options_follow_the_serve_config():
    cfg = serving_config({"config_file": "serving/configs/tiny.yaml"})
    production = serve_config_deployments(read_serve_config())
    options = deployment_options(cfg, num_cpus=4)
    for name in (INGRESS, MODEL):
        policy, local = production[name]["autoscaling_config"], options[name]["autoscaling_config"]
        # The policy is production's; only max_replicas is capped at what this machine can hold.
        assert {k: v for k, v in local.items() if k != "max_replicas"} == {
            k: v for k, v in policy.items() if k != "max_replicas"
        }
        assert 1 <= local["max_replicas"] <= policy["max_replicas"]
        for key in (
            "max_ongoing_requests",
            "max_queued_requests",
            "health_check_period_s",
            "graceful_shutdown_timeout_s",
        ):
            assert options[name].get(key) == production[name].get(key)
    # On CPU a model replica takes torch_threads CPUs and no GPU: 3 fit beside the ingress on 4 CPUs.
    assert options[MODEL]["ray_actor_options"] == {"num_cpus": 1}
    assert options[MODEL]["autoscaling_config"]["max_replicas"] == 3
    fixed = deployment_options(cfg, autoscaling=False)
    assert all(o["num_replicas"] == 1 and "autoscaling_config" not in o for o in fixed.values())
    assert fixed[MODEL]["max_ongoing_requests"] == production[MODEL]["max_ongoing_requests"]


async def _load_until_second_replica(
    url: str, clients: int, timeout_s: float
) -> tuple[float, dict[int, int]]:
    """Keep ``clients`` requests in flight until a second model replica answers; (seconds, status counts)."""
    codes: dict[int, int] = {}
    stop = asyncio.Event()

    async def client(c: httpx.AsyncClient, i: int) -> None:
        n = 0
        while not stop.is_set():
            body = {"prompt": f"a boat {i}", "height": 128, "width": 128, "seed": n}
            r = await c.post("/v1/generate/subject", json=body)
            codes[r.status_code] = codes.get(r.status_code, 0) + 1
            n += 1

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=64)) as c:
        started = time.monotonic()
        tasks = [asyncio.create_task(client(c, i)) for i in range(clients)]
        replicas: set[str] = set()
        try:
            while len(replicas) < 2 and time.monotonic() - started < timeout_s:
                replicas.add((await c.get("/v1/stats")).json()["replica"])
                await asyncio.sleep(0.5)
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
        assert len(replicas) == 2, f"no second model replica within {timeout_s:g} s of load"
        return time.monotonic() - started, codes


def test_python_m_serving_autoscales_and_stops_cleanly_on_sigterm(tmp_path):
    # The production policy file with the model's upscale delay cut from 30 s to 5 s (a test of the
    # policy's mechanism, not of its patience), passed as an operator would pass their own.
    spec = read_serve_config()
    (model,) = [d for d in spec["applications"][0]["deployments"] if d["name"] == MODEL]
    assert model["autoscaling_config"]["upscale_delay_s"] == 30
    model["autoscaling_config"]["upscale_delay_s"] = 5
    policy = tmp_path / "serve_config.yaml"
    policy.write_text(yaml.safe_dump(spec))
    service = LocalService(tmp_path / "serving.log", "--serve-config", str(policy), "torch_threads=1")
    try:
        service.wait_healthy()
        # 24 requests in flight against a target of 16 per model replica: the policy asks for a second.
        seconds, codes = asyncio.run(_load_until_second_replica(service.url, clients=24, timeout_s=180))
        assert set(codes) == {200}, codes
        print(f"second model replica answered {seconds:.1f} s into the load")
        service.stop(signal.SIGTERM)
    finally:
        service.kill_all()


@pytest.mark.slow
def test_python_m_serving_serves_the_tiny_preset_and_stops_cleanly_on_ctrl_c(tmp_path):
    service = LocalService(tmp_path / "serving.log", "--no-autoscaling", "torch_threads=1")
    try:
        service.wait_healthy()
        r = httpx.post(
            f"{service.url}/v1/generate/subject", json={"prompt": "a boat", "seed": 3}, timeout=120
        )
        assert r.status_code == 200, r.text
        assert Image.open(io.BytesIO(r.content)).size == (64, 64)  # the tiny preset's image_size
        service.stop(signal.SIGINT)
    finally:
        service.kill_all()

"""`python -m serving` starts the tiny service on a private local Ray instance and stops on Ctrl-C."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from cluster.local import free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_python_m_serving_serves_the_tiny_preset():
    port = free_port()
    cmd = [sys.executable, "-m", "serving", "--port", str(port), "--num-cpus", "2", "torch_threads=1"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ), start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, "python -m serving exited early"
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "the service did not come up"
            time.sleep(2)
        r = httpx.post(f"{url}/v1/generate/subject", json={"prompt": "a boat", "seed": 3}, timeout=120)
        assert r.status_code == 200, r.text
        assert Image.open(io.BytesIO(r.content)).size == (64, 64)  # the tiny preset's image_size
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

"""Shared test set-up: offline, loopback Ray, one local Ray cluster per session, seeded tiny models."""

from __future__ import annotations

import os
import threading

from cluster.local import apply_project_env
from stylear_core.ray_connection import short_temp_dir

apply_project_env()  # before torch / ray / transformers are imported anywhere
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # 2 shared cores: more threads only thrash on tiny models


@pytest.fixture(scope="session")
def ray_session():
    """A private local Ray instance for the whole session (own temp dir, capped object store, no dashboard)."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    temp_dir = short_temp_dir("sar-t-")
    ray.init(
        address="local",
        num_cpus=4,  # oversubscribe 2 cores: actor pools + driver tasks in one test
        object_store_memory=400 * 1024 * 1024,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        _temp_dir=temp_dir,
        log_to_driver=True,
        runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}},
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module", autouse=True)
def _no_torch_threads_outlive_their_module(request):
    """A module that leaves a torch thread alive slows every later test in the process: the idle thread
    keeps its OpenMP team, and with more OpenMP threads than cores libgomp stops spinning between
    parallel regions (a 2-thread VQGAN training took 1.8x the time beside one such thread; the cut-down
    world's fixture, which trains its VQGAN in the test process, is the largest victim).
    A model built outside Serve is closed by its fixture (``StyleARModelDeployment.close``)."""
    yield
    from serving.model import PREPARE_THREAD_NAME
    from stylear_core.inference.continuous import LOOP_THREAD_NAME

    torch_threads = (LOOP_THREAD_NAME, PREPARE_THREAD_NAME)  # the project's threads that run torch
    left = [t.name for t in threading.enumerate() if t.name in torch_threads and t.is_alive()]
    assert not left, f"{request.module.__name__} left torch threads running: {left} (close what started them)"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

"""Shared test set-up: offline, loopback Ray, one local Ray cluster per session, seeded tiny models."""

from __future__ import annotations

import os

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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

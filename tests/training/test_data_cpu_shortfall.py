"""Training on a cluster whose CPUs the Train workers take all of waits forever for Ray Data's reads: the
loop says so before it starts, naming the numbers and the way out."""

from __future__ import annotations

import pytest
import ray

from stylear_core.config import Resources
from stylear_core.training.loop import RayTrainConfig, data_cpu_shortfall

pytestmark = pytest.mark.usefixtures("ray_session")


def test_workers_that_leave_no_cpu_for_the_data_reads_are_named_before_training():
    free = int(ray.available_resources()["CPU"])
    assert free >= 2, "the suite's Ray session offers 4 CPUs"
    fits = RayTrainConfig(num_workers=1, worker=Resources(cpus=free - 1))
    assert data_cpu_shortfall(fits) is None
    greedy = RayTrainConfig(num_workers=1, worker=Resources(cpus=free))
    message = data_cpu_shortfall(greedy)
    assert message is not None and f"{free:g} CPU are free" in message and "ray.worker.cpus" in message
    two = RayTrainConfig(num_workers=2, worker=Resources(cpus=free / 2))
    assert data_cpu_shortfall(two) is not None

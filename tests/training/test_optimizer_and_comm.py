"""AdamW is fused on CUDA parameters and foreach elsewhere; ZeRO overlaps communication only on multi-GPU runs."""

from __future__ import annotations

import pytest
import torch

from stylear_core.training.deepspeed_config import build_deepspeed_config
from stylear_core.training.loop import OptimizerConfig, adamw_kernel, build_adamw


def test_adamw_kernel_is_fused_only_where_every_parameter_is_on_cuda():
    assert adamw_kernel({"cuda"}) == {"fused": True}
    assert adamw_kernel({"cpu"}) == {"foreach": True}
    assert adamw_kernel({"cuda", "cpu"}) == {"foreach": True}
    # Offloaded optimizer state lives in CPU memory: the CUDA-only kernel does not apply.
    assert adamw_kernel({"cuda"}, offload=True) == {"foreach": True}


def test_build_adamw_on_cpu_uses_foreach_and_the_configured_hyperparameters():
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))]
    opt = build_adamw(params, OptimizerConfig(lr=0.5, betas=[0.8, 0.9], eps=1e-6, weight_decay=0.1))
    group = opt.param_groups[0]
    assert group["foreach"] is True and not group["fused"]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (0.5, (0.8, 0.9), 1e-6, 0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert all((p < 1).all() for p in params)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_build_adamw_on_cuda_is_fused():
    params = [torch.nn.Parameter(torch.ones(3, device="cuda"))]
    assert build_adamw(params, OptimizerConfig()).param_groups[0]["fused"] is True


def test_overlap_comm_only_on_gpu_with_more_than_one_rank():
    def overlap(world: int, on_gpu: bool) -> bool:
        return build_deepspeed_config(2, 1, 1, world, on_gpu=on_gpu)["zero_optimization"]["overlap_comm"]

    assert overlap(8, on_gpu=True)
    assert not overlap(1, on_gpu=True)  # nothing to reduce across ranks
    assert not overlap(8, on_gpu=False)  # gloo on CPU: no CUDA streams to overlap on
    assert build_deepspeed_config(3, 1, 1, 4, on_gpu=True)["zero_optimization"]["overlap_comm"]
    # The default follows the machine.
    default = build_deepspeed_config(2, 1, 1, 2)["zero_optimization"]["overlap_comm"]
    assert default == torch.cuda.is_available()

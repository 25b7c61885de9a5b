"""DeepSpeed engine configs for the training jobs: ZeRO stage, precision, batch geometry, clipping.

The optimizer and LR schedule are torch objects handed to ``deepspeed.initialize`` (AdamW and a
``LambdaLR``), so the config carries ``zero_allow_untested_optimizer`` and no ``optimizer`` /
``scheduler`` blocks: that keeps DeepSpeed from JIT-building its fused Adam ops, and the same code runs
on CPU (gloo) and GPU (NCCL).
"""

from __future__ import annotations

from typing import Any, Literal

import torch

Precision = Literal["auto", "fp32", "bf16"]


def resolve_precision(precision: Precision, use_gpu: bool) -> Literal["fp32", "bf16"]:
    """``auto`` -> bf16 on a GPU that supports it, fp32 otherwise (CPU runs are fp32)."""
    if precision != "auto":
        return precision
    if use_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def build_deepspeed_config(
    zero_stage: int,
    micro_batch_size: int,
    grad_accum_steps: int,
    world_size: int,
    precision: Literal["fp32", "bf16"] = "fp32",
    grad_clip: float = 1.0,
    offload_optimizer: bool = False,
    reduce_bucket_size: int = 50_000_000,
    on_gpu: bool | None = None,
) -> dict[str, Any]:
    """The ``config=`` dict for ``deepspeed.initialize``.

    Takes the ZeRO stage (2: optimizer state and gradients sharded; 3: parameters too), the per-rank
    micro batch, the gradient-accumulation steps, the data-parallel world size, the precision and the
    gradient-norm clip (0 disables). ``offload_optimizer`` keeps the optimizer state in CPU memory.
    ``on_gpu`` (default: a CUDA device is available) turns on ``overlap_comm`` when ``world_size > 1``.
    Gives a dict DeepSpeed validates (``train_batch_size = micro * accum * world``).
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0-3, got {zero_stage}")
    if micro_batch_size < 1 or grad_accum_steps < 1 or world_size < 1:
        raise ValueError("micro_batch_size, grad_accum_steps and world_size must be >= 1")
    if on_gpu is None:
        on_gpu = torch.cuda.is_available()
    zero: dict[str, Any] = {
        "stage": zero_stage,
        # Gradient reduction on a side CUDA stream, overlapped with the rest of the backward pass: only
        # a gain with something to reduce across ranks (world > 1), and only on GPUs (it rides on CUDA
        # streams; the CPU accelerator with gloo has none). It costs ~4.5x reduce_bucket_size of buffers.
        "overlap_comm": bool(on_gpu and world_size > 1),
        "contiguous_gradients": True,
        "reduce_bucket_size": reduce_bucket_size,
    }
    if zero_stage == 3:
        zero.update(
            {
                "stage3_prefetch_bucket_size": reduce_bucket_size,
                "stage3_param_persistence_threshold": 10_000,
                # Adapters and the resampler are exported from gathered parameters, not from a
                # consolidated 16-bit copy of the whole (mostly frozen) model.
                "stage3_gather_16bit_weights_on_model_save": False,
            }
        )
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": micro_batch_size * grad_accum_steps * world_size,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": 1_000_000_000,  # metrics go through ray.train.report, not DeepSpeed's logger
        "wall_clock_breakdown": False,
    }
    if grad_clip > 0:
        config["gradient_clipping"] = grad_clip
    return config

"""A tiny random depth estimator of a real architecture (DPT), for tests and the tiny preset's curation.

``DPTForDepthEstimation`` at toy sizes (a 4-layer ViT of width 16 on 32 px inputs, about 33k
parameters) with seeded random weights and a ``DPTImageProcessor``; saved in the
``save_pretrained`` layout, it loads through :func:`~stylear_core.models.depth.build_depth_estimator`
like a real checkpoint. Nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import torch

from stylear_core.models.depth import DepthEstimator

TINY_DEPTH_INPUT_SIDE = 32


def build_tiny_depth_estimator(seed: int = 0) -> DepthEstimator:
    """A :class:`DepthEstimator` over a tiny random ``DPTForDepthEstimation`` (weights from ``seed``)."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    config = DPTConfig(
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=TINY_DEPTH_INPUT_SIDE,
        patch_size=8,
        backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[8, 8, 16, 16],
        fusion_hidden_size=8,
        use_auxiliary_head=False,
    )
    with torch.random.fork_rng(devices=[]):  # seeded weights without moving the caller's random stream
        torch.manual_seed(seed)
        model = DPTForDepthEstimation(config)
    side = TINY_DEPTH_INPUT_SIDE
    processor = DPTImageProcessor(size={"height": side, "width": side}, keep_aspect_ratio=False)
    return DepthEstimator(model, processor)


def save_tiny_depth_estimator(path: str | Path, seed: int = 0) -> Path:
    """Write :func:`build_tiny_depth_estimator`'s model and processor to ``path`` (``save_pretrained``)."""
    path = Path(path)
    estimator = build_tiny_depth_estimator(seed)
    estimator.model.save_pretrained(str(path))
    estimator.processor.save_pretrained(str(path))
    return path


def tiny_depth_estimator_dir(cache_dir: str | Path, seed: int = 0) -> Path:
    """The tiny depth estimator's directory under ``cache_dir``, written on first use (then renamed into
    place, so concurrent builders keep the first complete one)."""
    root = Path(cache_dir) / f"tiny_dpt_depth_seed{seed}"
    if not (root / "config.json").is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = root.parent / f".{root.name}.{uuid.uuid4().hex[:8]}.tmp"
        save_tiny_depth_estimator(tmp, seed)
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished first: keep its build
            shutil.rmtree(tmp, ignore_errors=True)
    return root


__all__ = ["build_tiny_depth_estimator", "save_tiny_depth_estimator", "tiny_depth_estimator_dir"]

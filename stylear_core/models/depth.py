"""Depth maps for condition images: a transformers depth estimator (DPT, Depth Anything) from a local dir.

StyleAR controls layout with a depth map as its condition image. The map comes from the user, or from
an estimator: any ``AutoModelForDepthEstimation`` checkpoint saved with ``save_pretrained`` (weights,
``config.json`` and the image processor's ``preprocessor_config.json``), loaded from a local directory
only. Its relative depth is scaled to 0..255 per image, near bright, as depth-map images are drawn,
and given back as a grey RGB image of the input's size (what the VQGAN then encodes).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from stylear_core.devices import resolve_device


class DepthEstimator:
    """Images -> depth maps (grey RGB images of the same sizes, near = bright).

    Takes a transformers depth model (``DPTForDepthEstimation``, ``DepthAnythingForDepthEstimation``,
    ...) and its image processor; the model runs in eval mode on ``device``.
    """

    def __init__(self, model: nn.Module, processor, device: str | torch.device = "cpu") -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.processor = processor

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> DepthEstimator:
        """The estimator saved at the local directory ``path`` (never downloaded)."""
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path}: no depth estimator here (a save_pretrained dir with config.json)"
            )
        model = AutoModelForDepthEstimation.from_pretrained(str(path), local_files_only=True)
        processor = AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
        return cls(model, processor, device)

    @torch.inference_mode()
    def __call__(self, images: Sequence[Image.Image]) -> list[Image.Image]:
        """The depth map of each image, at its size."""
        images = [im.convert("RGB") for im in images]
        maps: list[Image.Image | None] = [None] * len(images)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            by_size.setdefault(im.size, []).append(i)
        # One forward per input size: a keep-aspect processor (Depth Anything's) sizes each aspect apart.
        for (width, height), members in by_size.items():
            inputs = self.processor(images=[images[i] for i in members], return_tensors="pt").to(self.device)
            outputs = self.model(**inputs)
            depths = self.processor.post_process_depth_estimation(
                outputs, target_sizes=[(height, width)] * len(members)
            )
            for i, depth in zip(members, depths):
                maps[i] = depth_to_image(depth["predicted_depth"])
        return maps  # type: ignore[return-value]


def depth_to_image(depth: torch.Tensor) -> Image.Image:
    """A ``(H, W)`` relative depth (larger = nearer, as DPT / Depth Anything predict) -> a grey RGB image."""
    depth = depth.detach().float().cpu()
    low, high = depth.min(), depth.max()
    # A flat map stays black; any spread, however small (a random model predicts ~1e-9), is stretched.
    scaled = (depth - low) / (high - low).clamp_min(torch.finfo(torch.float32).tiny) * 255.0
    return Image.fromarray(scaled.round().to(torch.uint8).numpy()).convert("RGB")  # uint8 (H, W): mode L


def build_depth_estimator(
    path: str | Path | None, device: str | torch.device = "cpu"
) -> DepthEstimator | None:
    """The depth estimator of the local directory ``path``; None when ``path`` is empty or None."""
    return DepthEstimator.from_pretrained(path, device) if path else None


__all__ = ["DepthEstimator", "build_depth_estimator", "depth_to_image"]

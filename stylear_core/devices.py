"""One reading of the ``device`` option that every model-holding config has."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` (or empty) -> ``cuda`` when a GPU is visible (Ray sets ``CUDA_VISIBLE_DEVICES`` per
    task and actor), else ``cpu``; any other name (``cpu``, ``cuda:1``, ``meta``) as given."""
    if isinstance(device, torch.device):
        return device
    if device in ("", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


__all__ = ["resolve_device"]

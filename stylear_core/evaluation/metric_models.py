"""The feature extractors of the subject metrics: DINO and CLIP, from local weights or seeded random ones.

Subject evaluation scores with them, and proxy data (stage 2) filters its images with the same models,
so both build them here from one :class:`SubjectMetricsConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stylear_core.config import option
from stylear_core.devices import resolve_device
from stylear_core.evaluation.dino import DINO_PRESETS, DinoFeatureExtractor
from stylear_core.models.clip import ClipScorer


@dataclass
class SubjectMetricsConfig:
    """The DINO and CLIP feature extractors of the subject metrics (local weights, or random: tests, demo)."""

    dino_preset: str = option("vits16", "DINO ViT preset", choices=tuple(DINO_PRESETS))
    dino_checkpoint: str = option("", "local dino_vits16 weights (transformers dir or .pth); '' = random")
    clip_preset: str = option("ViT-B-32", "open_clip architecture of CLIP-I / CLIP-T ('tiny': random toy)")
    clip_checkpoint: str = option("", "local open_clip weights file or dir; '' = random init")
    device: str = option("auto", "torch device; auto = cuda if available else cpu")
    batch_size: int = option(32, "images per feature-extractor forward")
    seed: int = option(0, "seed of the random initialisation when a checkpoint is not given")


def build_metric_models(cfg: SubjectMetricsConfig) -> tuple[DinoFeatureExtractor, ClipScorer]:
    """The ``(dino, clip)`` feature extractors of ``cfg``: weights from the local checkpoints, or random ones
    seeded with ``cfg.seed`` (so every process that builds them gets the same models)."""
    device = resolve_device(cfg.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        dino = DinoFeatureExtractor.from_preset(
            cfg.dino_preset, cfg.dino_checkpoint or None, device=device, batch_size=cfg.batch_size
        )
        torch.manual_seed(cfg.seed + 1)
        clip = ClipScorer.from_preset(
            cfg.clip_preset, checkpoint=cfg.clip_checkpoint or None, device=device, batch_size=cfg.batch_size
        )
    return dino, clip


__all__ = ["SubjectMetricsConfig", "build_metric_models"]

"""A tiny CLIP trained contrastively on the miniature world, so that its frozen features carry style.

The random tiny CLIP separates palettes and textures but hardly strokes (a linear probe on its
features reads the stroke of a held-out image 65% of the time, chance 33%), and the style tokens
can only pass on what the features hold. This trains the whole tiny open_clip ``CLIP`` with
open_clip's own ``ClipLoss`` on (image, style caption) pairs: the image is a random scene in one of
the training styles, the caption names only the style (``"pastel palette, dots background, hatched
shapes"``), so the image features learn the style and learn to ignore the content. Each batch holds
distinct styles, so no in-batch negative shares the positive's caption. Held-out styles are never
seen; their captions are new combinations of known words.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import open_clip
import torch
from open_clip.loss import ClipLoss

from stylear_core.config import option
from stylear_core.data.synthetic import render, sample_content
from stylear_core.miniature.data import TRAIN_STYLES, WORLD_IMAGE_SIZE
from stylear_core.models.clip import build_clip


@dataclass
class StyleClipTrainingConfig:
    """How the tiny CLIP is trained on (scene, style caption) pairs."""

    steps: int = option(400, "optimizer steps")
    batch_size: int = option(64, "pairs per step, each of a distinct style")
    lr: float = option(1e-3, "peak AdamW learning rate (cosine decay)")
    seed: int = option(0, "seed of initialisation and scenes")


def train_style_clip(config: StyleClipTrainingConfig) -> tuple[open_clip.CLIP, dict[str, float]]:
    """Train the tiny CLIP (both towers) with ``ClipLoss``; returns the model (eval mode) and its losses."""
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        bundle = build_clip("tiny")
    model = bundle.model.train()
    styles = list(TRAIN_STYLES)
    captions = bundle.tokenizer([s.describe() for s in styles])
    rng = random.Random(f"miniature/style-clip/{config.seed}")
    loss_fn = ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=config.steps)
    first = last = float("nan")
    for step in range(config.steps):
        chosen = rng.sample(range(len(styles)), min(config.batch_size, len(styles)))
        images = [render(sample_content(rng, 1), styles[i], WORLD_IMAGE_SIZE) for i in chosen]
        pixels = torch.stack([bundle.preprocess(im) for im in images])
        image_features, text_features, scale = model(pixels, captions[chosen])
        loss = loss_fn(image_features, text_features, scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        last = float(loss.detach())
        if step == 0:
            first = last
    model.eval()
    return model, {"first_loss": first, "final_loss": last, "seconds": time.perf_counter() - start}


__all__ = ["StyleClipTrainingConfig", "train_style_clip"]

"""Train the miniature world's VQGAN: Chameleon's architecture, CPU-sized, on procedural images.

The random tiny VQGAN decodes almost the same picture for any codes, so nothing generated through
it can be judged. This trainer fits :func:`mini_vqgan_config` (64 px images, downsample 8, so 8x8
codes per image) to procedural images until reconstructions are recognisable:

- reconstruction loss L1 + L2 on pixels in [-1, 1], with the straight-through estimator through
  the codebook and the usual commitment term;
- the codebook is learnt by exponential moving averages of the latents assigned to each code
  (k-means-like, as in VQ-VAE-2), and codes unused for a while are restarted on latents of the
  current batch, so the whole codebook stays in use;
- it trains on crops aligned to the 8-pixel code grid (the model is fully convolutional apart
  from the mid attention): a quarter of the pixels per sample, the same textures and edges; the
  last ``full_image_steps`` train on whole images, since GroupNorm's per-image statistics and the
  mid attention differ between a crop and a whole image (a crop-only model reconstructs whole
  images badly);
- optionally (``autoencoder_steps``) the first steps skip the codebook, a plain autoencoder, and the
  codebook then starts as k-means of the encoder's latents over whole images. Quantizing from the first
  step slows early learning (the loss after 200 steps: 0.69 against 0.41), and the warm start reaches a
  higher PSNR in less CPU time: ``benchmarks/vqgan_warm_start.py`` on 2 cores, 1000 steps on 512 images,
  19.6 dB in 166 s without it, 20.5 dB in 141 s with 300 warm-start steps and whole-image batches of 4.

Everything is seeded: the same config gives the same weights on the same machine.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stylear_core.config import option
from stylear_core.models.vqgan import ChameleonVQGAN, mini_vqgan_config


@dataclass
class VQGANTrainingConfig:
    """How the miniature VQGAN is trained (on crops of procedural images)."""

    steps: int = option(2500, "optimizer steps")
    batch_size: int = option(32, "crops per step")
    crop: int = option(32, "crop side in pixels (a multiple of the downsample factor)")
    full_image_steps: int = option(
        1500,
        "the last steps train on whole images: GroupNorm statistics and the mid attention see what inference sees",
    )
    full_image_batch_size: int = option(16, "whole images per step in those last steps")
    lr: float = option(2e-3, "peak Adam learning rate (cosine decay to 5% of it)")
    warmup_steps: int = option(50, "linear warm-up steps")
    commitment: float = option(0.25, "weight of the commitment loss |z - sg(q)|^2")
    ema_decay: float = option(0.9, "decay of the codebook's moving averages")
    restart_after: int = option(50, "restart a code unused for this many steps")
    seed: int = option(0, "seed of initialisation and crop sampling")
    autoencoder_steps: int = option(
        0,
        "the first steps skip the codebook (a plain autoencoder); then the codebook starts as k-means of the "
        "encoder's latents",
    )


@dataclass
class VQGANTrainingStats:
    """What training measured: final loss, codebook use and time."""

    final_loss: float
    first_loss: float
    codes_used: int
    seconds: float


def psnr(reference: torch.Tensor, reconstruction: torch.Tensor) -> float:
    """Mean PSNR in dB of images in [-1, 1] (peak-to-peak 2), averaged over images."""
    mse = (reference.float() - reconstruction.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(4.0 / mse)).mean())


class _EmaCodebook:
    """Moving-average k-means over the encoder's latents, written into the model's codebook."""

    def __init__(self, weight: torch.Tensor, decay: float, restart_after: int) -> None:
        self.weight = weight  # the model's codebook tensor, updated in place
        self.decay = decay
        self.restart_after = restart_after
        n = weight.shape[0]
        self.cluster_size = torch.ones(n)
        self.embed_sum = weight.detach().clone()
        self.idle = torch.zeros(n, dtype=torch.long)

    @torch.no_grad()
    def reset(self, centroids: torch.Tensor) -> None:
        self.weight.copy_(centroids)
        self.embed_sum.copy_(centroids)
        self.cluster_size.fill_(1.0)
        self.idle.zero_()

    @torch.no_grad()
    def update(self, flat: torch.Tensor, codes: torch.Tensor, generator: torch.Generator) -> None:
        n = self.weight.shape[0]
        onehot = F.one_hot(codes, n).float()
        counts = onehot.sum(0)
        sums = onehot.t() @ flat
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + 1e-5) / (total + n * 1e-5) * total
        self.weight.copy_(self.embed_sum / smoothed[:, None])
        self.idle = torch.where(counts > 0, torch.zeros_like(self.idle), self.idle + 1)
        dead = torch.nonzero(self.idle >= self.restart_after).flatten()
        if dead.numel():
            pick = torch.randint(0, flat.shape[0], (dead.numel(),), generator=generator)
            fresh = flat[pick] + 0.01 * torch.randn(dead.numel(), flat.shape[1], generator=generator)
            self.weight[dead] = fresh
            self.embed_sum[dead] = fresh
            self.cluster_size[dead] = 1.0
            self.idle[dead] = 0


@torch.no_grad()
def _kmeans(points: torch.Tensor, k: int, generator: torch.Generator, iterations: int = 20) -> torch.Tensor:
    """``k`` centroids of ``points``: k-means++ seeding (each next seed drawn in proportion to its squared
    distance from the seeds so far, so separated clusters each get one), then Lloyd's iterations; a
    cluster left empty takes a random point."""
    seeds = [int(torch.randint(0, points.shape[0], (1,), generator=generator))]
    nearest = (points - points[seeds[0]]).pow(2).sum(1)
    for _ in range(k - 1):
        seeds.append(int(torch.multinomial(nearest.clamp_min(1e-12), 1, generator=generator)))
        nearest = torch.minimum(nearest, (points - points[seeds[-1]]).pow(2).sum(1))
    centroids = points[seeds].clone()
    for _ in range(iterations):
        assign = torch.cdist(points, centroids).argmin(1)
        counts = torch.bincount(assign, minlength=k).float()
        sums = torch.zeros_like(centroids).index_add_(0, assign, points)
        empty = counts == 0
        centroids = torch.where(empty[:, None], centroids, sums / counts.clamp_min(1)[:, None])
        if empty.any():
            centroids[empty] = points[
                torch.randint(0, points.shape[0], (int(empty.sum()),), generator=generator)
            ]
    return centroids


@torch.no_grad()
def _latent_kmeans(
    model: ChameleonVQGAN, images: torch.Tensor, k: int, generator: torch.Generator, count: int = 256
) -> torch.Tensor:
    """k-means centroids of the encoder's latents over ``count`` whole images."""
    pick = torch.randperm(images.shape[0], generator=generator)[:count]
    z = torch.cat([model.encode_latents(images[chunk]) for chunk in pick.split(64)])
    return _kmeans(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), k, generator)


def _aligned_crops(
    images: torch.Tensor, count: int, crop: int, grid: int, generator: torch.Generator
) -> torch.Tensor:
    side = images.shape[-1]
    index = torch.randint(0, images.shape[0], (count,), generator=generator)
    cells = (side - crop) // grid + 1
    ys = torch.randint(0, cells, (count,), generator=generator) * grid
    xs = torch.randint(0, cells, (count,), generator=generator) * grid
    return torch.stack(
        [
            images[i, :, y : y + crop, x : x + crop]
            for i, y, x in zip(index.tolist(), ys.tolist(), xs.tolist())
        ]
    )


def train_vqgan(
    model: ChameleonVQGAN,
    images: torch.Tensor,
    config: VQGANTrainingConfig,
    progress: Callable[[int, float], None] | None = None,
    weights: torch.Tensor | None = None,
) -> VQGANTrainingStats:
    """Fit ``model`` (in place) to ``images`` ``(N, 3, H, W)`` in [-1, 1]; returns what it measured.

    The encoder, decoder and 1x1 convs learn by Adam; the codebook by moving averages (see the
    module docstring). ``progress(step, loss)`` is called every 100 steps. ``weights`` ``(N, 1, H, W)``
    (default 1) weighs each pixel's reconstruction error: small objects would otherwise count for
    little against the background, and the codebook would spend itself on textures.
    """
    if weights is None:
        weights = torch.ones_like(images[:, :1])
    stacked = torch.cat([images, weights.to(images.dtype)], dim=1)
    if config.crop % model.downsample or config.crop > images.shape[-1]:
        raise ValueError(f"crop {config.crop} must be a multiple of {model.downsample} and fit the images")
    if config.autoencoder_steps and config.autoencoder_steps >= config.steps:
        raise ValueError(
            f"autoencoder_steps {config.autoencoder_steps} must be fewer than steps {config.steps}: the codebook"
            " is only seeded and trained after them"
        )
    generator = torch.Generator().manual_seed(config.seed)
    codebook = model.quantize.embedding.weight
    codebook.requires_grad_(False)
    ema = _EmaCodebook(codebook.data, config.ema_decay, config.restart_after)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr, betas=(0.9, 0.99))

    def lr_at(step: int) -> float:
        if step < config.warmup_steps:
            return config.lr * (step + 1) / config.warmup_steps
        t = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return config.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))

    model.train()
    start = time.perf_counter()
    first_loss = loss_value = float("nan")
    used = torch.zeros(codebook.shape[0], dtype=torch.bool)
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        if step >= config.steps - config.full_image_steps:
            pick = torch.randint(0, images.shape[0], (config.full_image_batch_size,), generator=generator)
            xw = stacked[pick]
        else:
            xw = _aligned_crops(stacked, config.batch_size, config.crop, model.downsample, generator)
        x, pixel_weight = xw[:, :3], xw[:, 3:]
        z = model.encode_latents(x)
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        quantized = step >= config.autoencoder_steps
        if config.autoencoder_steps and step == config.autoencoder_steps:
            ema.reset(_latent_kmeans(model, images, codebook.shape[0], generator))
        if quantized:
            with torch.no_grad():
                codes = torch.cdist(flat, codebook).argmin(1)
            q = codebook[codes]
        else:  # the warm start: a plain autoencoder, no codebook yet
            q = flat.detach()
        commit = F.mse_loss(flat, q)
        q_st = flat + (q - flat).detach()
        recon = model.decode_latents(q_st.view(b, h, w, c).permute(0, 3, 1, 2))
        error = (recon - x).abs().mean(1, keepdim=True) + (recon - x).pow(2).mean(1, keepdim=True)
        loss = (pixel_weight * error).sum() / pixel_weight.sum() + config.commitment * commit
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if quantized:
            ema.update(flat.detach(), codes, generator)
        loss_value = float(loss.detach())
        if step == 0:
            first_loss = loss_value
        if quantized and step >= config.steps - 100:
            used[codes] = True
        if progress is not None and (step + 1) % 100 == 0:
            progress(step + 1, loss_value)
    model.eval()
    codebook.requires_grad_(True)
    return VQGANTrainingStats(
        final_loss=loss_value,
        first_loss=first_loss,
        codes_used=int(used.sum()),
        seconds=time.perf_counter() - start,
    )


__all__ = ["VQGANTrainingConfig", "VQGANTrainingStats", "mini_vqgan_config", "psnr", "train_vqgan"]

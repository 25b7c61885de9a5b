"""Judges of the miniature world: small CNNs that read style and content off procedural images.

They are trained on the procedural generator's own images, whose ground truth is known, and never
on anything the model under test produced, so they can score that model:

- the **style judge** names the palette, background texture and stroke of an image (a style is
  right when all three are);
- the **content judge** reads the 3x3 grid of named positions: for each cell, which object kind is
  there (or none) and its colour. Content accuracy asks whether the prompt's objects are where the
  prompt put them; leakage asks whether the style reference's object shows up in the output.

Both see images through the same light corruptions (blur, pixel noise, a VQ-like colour jitter), so
decoded VQ images, which are slightly soft, are read as well as raw ones.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from stylear_core.config import option
from stylear_core.data.images import to_tensor
from stylear_core.data.synthetic import (
    ALL_STYLES,
    COLOURS,
    OBJECT_KINDS,
    PALETTES,
    POSITIONS,
    STROKES,
    TEXTURES,
    ContentSpec,
    StyleSpec,
    render,
    sample_content,
)

PALETTE_NAMES = tuple(PALETTES)
COLOUR_NAMES = tuple(sorted(COLOURS))
POSITION_NAMES = tuple(POSITIONS)  # row-major over the 3x3 grid, as POSITIONS is declared
NO_OBJECT = len(OBJECT_KINDS)  # the kind index of an empty cell


def _cell(position: str) -> int:
    col, row = POSITIONS[position]
    return row * 3 + col


def style_labels(style: StyleSpec) -> tuple[int, int, int]:
    """(palette, texture, stroke) indices of ``style``."""
    return PALETTE_NAMES.index(style.palette), TEXTURES.index(style.texture), STROKES.index(style.stroke)


def content_labels(content: ContentSpec) -> tuple[list[int], list[int]]:
    """Per-cell kind index (``NO_OBJECT`` where empty) and colour index (-100 where empty), 9 each."""
    kinds = [NO_OBJECT] * 9
    colours = [-100] * 9
    for obj in content.objects:
        kinds[_cell(obj.position)] = OBJECT_KINDS.index(obj.kind)
        colours[_cell(obj.position)] = COLOUR_NAMES.index(obj.colour)
    return kinds, colours


class _Trunk(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        # Three halvings then a stride-1 layer: an 8x8 map (8 px per cell, as the VQGAN's codes), so the
        # content judge's 3x3 pooling sees each grid cell through about three features, not one.
        for out, stride in ((width, 2), (2 * width, 2), (2 * width, 2), (4 * width, 1)):
            layers += [nn.Conv2d(channels, out, 3, stride=stride, padding=1), nn.BatchNorm2d(out), nn.GELU()]
            channels = out
        self.net = nn.Sequential(*layers)
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class StyleJudge(nn.Module):
    """Pixels ``(B, 3, 64, 64)`` in [-1, 1] -> logits of palette, texture and stroke."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.trunk = _Trunk(width)
        c = self.trunk.channels
        self.palette = nn.Linear(c, len(PALETTE_NAMES))
        self.texture = nn.Linear(c, len(TEXTURES))
        self.stroke = nn.Linear(c, len(STROKES))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three heads' logits."""
        h = self.trunk(x).mean(dim=(2, 3))
        return self.palette(h), self.texture(h), self.stroke(h)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3)`` predicted (palette, texture, stroke) indices."""
        return torch.stack([head.argmax(-1) for head in self(x)], dim=1)


class ContentJudge(nn.Module):
    """Pixels ``(B, 3, 64, 64)`` -> per grid cell: kind logits (kinds + none) and colour logits."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.trunk = _Trunk(width)
        c = self.trunk.channels
        self.pool = nn.AdaptiveAvgPool2d(3)
        self.kind = nn.Conv2d(c, NO_OBJECT + 1, 1)
        self.colour = nn.Conv2d(c, len(COLOUR_NAMES), 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Kind logits ``(B, 9, kinds+1)`` and colour logits ``(B, 9, colours)``, cells row-major."""
        h = self.pool(self.trunk(x))
        return (
            self.kind(h).flatten(2).transpose(1, 2),
            self.colour(h).flatten(2).transpose(1, 2),
        )

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-cell kind ``(B, 9)`` and colour ``(B, 9)`` indices."""
        kind, colour = self(x)
        return kind.argmax(-1), colour.argmax(-1)


@dataclass
class JudgeTrainingConfig:
    """How both judges are trained on procedural images."""

    num_images: int = option(12000, "training images (random content and style)")
    steps: int = option(1500, "optimizer steps per judge")
    batch_size: int = option(64, "images per step")
    lr: float = option(3e-3, "peak AdamW learning rate (cosine decay)")
    width: int = option(32, "base channel width of the CNNs")
    seed: int = option(0, "seed of the training images and initialisation")


def procedural_images(
    seed: int, count: int, size: int = 64, styles: Sequence[StyleSpec] = ALL_STYLES, max_objects: int = 2
) -> tuple[list[Image.Image], list[ContentSpec], list[StyleSpec]]:
    """``count`` random (content, style) renders from ``seed``: images, contents and styles."""
    rng = random.Random(f"judges/{seed}")
    contents = [sample_content(rng, max_objects) for _ in range(count)]
    chosen = [rng.choice(list(styles)) for _ in range(count)]
    return [render(c, s, size) for c, s in zip(contents, chosen)], contents, chosen


def corrupt(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Light corruptions of a batch in [-1, 1]: random blur, pixel noise and colour jitter."""
    b = x.shape[0]
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(b, 1, 1, 1, generator=generator) * 0.7
    x = (1 - mix) * x + mix * blur
    x = x + 0.06 * torch.rand(b, 1, 1, 1, generator=generator) * torch.randn(x.shape, generator=generator)
    x = x + 0.04 * torch.randn(b, 3, 1, 1, generator=generator)
    return x.clamp(-1, 1)


def _train(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    pixels: torch.Tensor,
    labels: torch.Tensor,
    config: JudgeTrainingConfig,
) -> float:
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=config.steps)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(config.steps):
        index = torch.randint(0, pixels.shape[0], (config.batch_size,), generator=generator)
        x = corrupt(pixels[index], generator)
        loss = loss_fn(model, x, labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    return float(loss.detach())


def _style_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    palette, texture, stroke = model(x)
    return (
        F.cross_entropy(palette, y[:, 0])
        + F.cross_entropy(texture, y[:, 1])
        + F.cross_entropy(stroke, y[:, 2])
    )


def _content_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    kind, colour = model(x)
    kinds, colours = y[:, :9], y[:, 9:]
    return F.cross_entropy(kind.reshape(-1, kind.shape[-1]), kinds.reshape(-1)) + F.cross_entropy(
        colour.reshape(-1, colour.shape[-1]), colours.reshape(-1), ignore_index=-100
    )


@dataclass
class Judges:
    """The trained style and content judges."""

    style: StyleJudge
    content: ContentJudge

    @torch.no_grad()
    def style_parts_correct(self, pixels: torch.Tensor, styles: Sequence[StyleSpec]) -> torch.Tensor:
        """``(B, 3)`` bool: the judge names the palette, texture and stroke of each expected style."""
        expected = torch.tensor([style_labels(s) for s in styles])
        return self.style.predict(pixels) == expected

    @torch.no_grad()
    def style_correct(self, pixels: torch.Tensor, styles: Sequence[StyleSpec]) -> torch.Tensor:
        """``(B,)`` bool: the judge names palette, texture and stroke of each expected style."""
        return self.style_parts_correct(pixels, styles).all(dim=1)

    @torch.no_grad()
    def content_correct(self, pixels: torch.Tensor, contents: Sequence[ContentSpec]) -> torch.Tensor:
        """``(B,)`` bool: every object of the content is found at its position with its kind (colour not asked)."""
        kinds, _ = self.content.predict(pixels)
        out = []
        for row, content in zip(kinds, contents):
            out.append(
                all(int(row[_cell(o.position)]) == OBJECT_KINDS.index(o.kind) for o in content.objects)
            )
        return torch.tensor(out)

    @torch.no_grad()
    def leaked(
        self, pixels: torch.Tensor, prompts: Sequence[ContentSpec], references: Sequence[ContentSpec]
    ) -> torch.Tensor:
        """``(B,)`` bool: an object of the reference appears (same kind, same cell) where the prompt asked for none of that kind."""
        kinds, _ = self.content.predict(pixels)
        out = []
        for row, prompt, reference in zip(kinds, prompts, references):
            asked = {(_cell(o.position), OBJECT_KINDS.index(o.kind)) for o in prompt.objects}
            out.append(
                any(
                    int(row[_cell(o.position)]) == OBJECT_KINDS.index(o.kind)
                    and (_cell(o.position), OBJECT_KINDS.index(o.kind)) not in asked
                    for o in reference.objects
                )
            )
        return torch.tensor(out)


@torch.no_grad()
def vq_round_trip(vq: nn.Module, pixels: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """``pixels`` through a VQGAN's encode and decode, in batches."""
    return torch.cat(
        [vq.decode(vq.encode(pixels[i : i + batch_size])) for i in range(0, len(pixels), batch_size)]
    )


def train_judges(config: JudgeTrainingConfig, vq: nn.Module | None = None) -> tuple[Judges, dict[str, float]]:
    """Train both judges on ``config.num_images`` procedural images; returns them and their final losses.

    With ``vq`` (the world's VQGAN), every second training image is its VQ reconstruction, so the
    judges read decoded images, which is what generated images are, as well as drawn ones.
    """
    start = time.perf_counter()
    images, contents, styles = procedural_images(config.seed, config.num_images)
    pixels = to_tensor(images)
    if vq is not None:
        pixels[1::2] = vq_round_trip(vq, pixels[1::2])
    style_y = torch.tensor([style_labels(s) for s in styles])
    content_y = torch.tensor([sum(content_labels(c), []) for c in contents])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        style, content = StyleJudge(config.width), ContentJudge(config.width)
    style_loss = _train(style, _style_loss, pixels, style_y, config)
    content_loss = _train(content, _content_loss, pixels, content_y, config)
    stats = {"style_loss": style_loss, "content_loss": content_loss, "seconds": time.perf_counter() - start}
    return Judges(style, content), stats


def colour_histogram_features(pixels: torch.Tensor, bins: int = 6) -> torch.Tensor:
    """``(B, bins**3)`` square roots of each image's colour histogram (``bins`` levels per channel, pixels
    ``(B, 3, H, W)`` in [-1, 1]). Each row has unit L2 norm, so the dot product of two rows is the
    Bhattacharyya coefficient of their histograms (1: the same colours)."""
    level = ((pixels.clamp(-1, 1) + 1) / 2 * (bins - 1e-4)).long()
    index = ((level[:, 0] * bins + level[:, 1]) * bins + level[:, 2]).flatten(1)
    counts = torch.zeros(pixels.shape[0], bins**3).scatter_add_(1, index, torch.ones(index.shape))
    return (counts / counts.sum(dim=1, keepdim=True)).sqrt()


class ColourPaletteJudge:
    """Names an image's palette from its colours alone, with no training loop: the palette most of its ``k``
    nearest neighbours have, among procedural images of every palette, by square-rooted colour histograms
    (``bins`` per channel).

    Palettes differ mostly in their background colours, which cover most of an image and survive a
    weak VQGAN's round trip, so this judge stays reliable where a CNN trained for a few hundred steps is
    not (a cut-down world's judges). It reads the palette only, never texture, stroke or content.
    On the quality gate's world (a 19.7 dB VQGAN), 300 held-out images: 7 neighbours over 1200 images
    with 8 bins read drawn images at 1.00 and decoded ones at 0.91; the nearest class mean over 600
    images with 6 bins, which this judge was before, at 0.97 and 0.77 (k from 3 to 15 gave 0.90-0.91).
    """

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, bins: int, k: int) -> None:
        self.reference_features = features  # (N, bins**3) of the fitted images
        self.reference_labels = labels  # (N,) their palette indices (PALETTE_NAMES)
        self.bins = bins
        self.k = k

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, bins**3)`` square roots of each image's colour histogram (pixels in [-1, 1])."""
        return colour_histogram_features(pixels, self.bins)

    @classmethod
    @torch.no_grad()
    def fit(
        cls, vq: nn.Module | None = None, seed: int = 0, images: int = 1200, bins: int = 8, k: int = 7
    ) -> ColourPaletteJudge:
        """Keeps ``images`` procedural renders of every style as the neighbours; with ``vq``, every second
        one is its VQ reconstruction (as generated images are decoded ones)."""
        drawn, _, styles = procedural_images(seed + 7919, images, max_objects=1)
        pixels = to_tensor(drawn)
        if vq is not None:
            pixels[1::2] = vq_round_trip(vq, pixels[1::2])
        labels = torch.tensor([PALETTE_NAMES.index(s.palette) for s in styles])
        return cls(colour_histogram_features(pixels, bins), labels, bins, k)

    @torch.no_grad()
    def predict(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B,)`` palette indices (:data:`PALETTE_NAMES`): the most common among each image's neighbours
        (a tie goes to the lower index)."""
        distances = torch.cdist(self.features(pixels), self.reference_features)
        nearest = distances.topk(self.k, dim=1, largest=False).indices
        return torch.mode(self.reference_labels[nearest], dim=1).values

    def correct(self, pixels: torch.Tensor, styles: Sequence[StyleSpec]) -> torch.Tensor:
        """``(B,)`` bool: the named palette is each expected style's."""
        expected = torch.tensor([PALETTE_NAMES.index(s.palette) for s in styles])
        return self.predict(pixels) == expected


def judge_accuracy(judges: Judges, pixels: torch.Tensor, contents, styles) -> dict[str, float]:
    """Accuracy of both judges on labelled images: style (all three parts), content (every object's kind + cell)."""
    return {
        "style": float(judges.style_correct(pixels, styles).float().mean()),
        "content": float(judges.content_correct(pixels, contents).float().mean()),
    }


__all__ = [
    "ColourPaletteJudge",
    "ContentJudge",
    "JudgeTrainingConfig",
    "Judges",
    "StyleJudge",
    "colour_histogram_features",
    "content_labels",
    "judge_accuracy",
    "procedural_images",
    "style_labels",
    "train_judges",
    "vq_round_trip",
]

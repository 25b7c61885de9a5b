"""Subjects in the miniature world: scenes that place a procedural subject in a cell, and its judge.

A subject scene is one procedural subject (:mod:`stylear_core.data.synthetic_subjects`: a robot, a
mushroom, ... with a rare token, ``"a sks robot"``) at one of the nine named positions, drawn on a
style's background, optionally beside one ordinary world object (a *distractor*) in another cell::

    scene = sample_subject_scene(random.Random(0))
    scene.prompt                     # "a sks robot at the top left and a small red circle at the bottom"
    render_subject_scene(scene, 64)  # PIL image

The **subject judge** (:class:`SubjectJudge`) reads the grid as the content judge does: for each cell,
which subject is there, or none. It is trained on subject scenes in the training styles, with world
objects beside the subject and scenes with no subject at all, and validated on held-out styles; it is
the world's stand-in for DINO / CLIP-I subject fidelity.

The subject keeps its own colours under every palette (they are its identity; the palette tones
world objects only), and it is sized to fill about one cell of the 3x3 grid, so the judge's
per-cell reading and the prompt's placement words mean the same cell.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from stylear_core.config import option
from stylear_core.data.images import to_tensor
from stylear_core.data.synthetic import (
    COLOURS,
    OBJECT_KINDS,
    POSITIONS,
    SIZES,
    ContentSpec,
    ObjectSpec,
    StyleSpec,
    background,
    place_words,
    render,
    shape_mask,
)
from stylear_core.data.synthetic_subjects import _SUBJECT_DESIGNS, SUBJECT_NAMES, subject_bounds
from stylear_core.miniature.data import HELD_OUT_STYLES, TRAIN_STYLES, WORLD_IMAGE_SIZE
from stylear_core.miniature.judges import JudgeTrainingConfig, _cell, _train, _Trunk, vq_round_trip

# A subject's unit as a fraction of the side: the tallest designs span ~1.85 units, so at 0.18 they are
# ~21 px tall at 64 px, one cell of the 3x3 grid (64 / 3 = 21.3 px).
DEFAULT_SUBJECT_SCALE = 0.18
# Sampled scenes vary the scale a little around the default, as generated subjects will.
SCALE_RANGE = (0.15, 0.19)


def subject_token(name: str) -> str:
    """The rare identifier token of subject ``name`` (``"sks"`` for the robot)."""
    if name not in _SUBJECT_DESIGNS:
        raise ValueError(f"unknown subject {name!r} (known: {SUBJECT_NAMES})")
    return _SUBJECT_DESIGNS[name][0]


def _subject_words(name: str, position: str, classmate: bool = False) -> str:
    # The same placement words as ObjectSpec.describe, so subject and object prompts read alike. A
    # class-mate is named by its class noun alone, as a class image is in DreamBooth ("a robot").
    token = "" if classmate else f"{subject_token(name)} "
    return f"a {token}{name} {place_words(position)}"


# What a class-mate's parts are painted with: the world's colours, white, near-black and grey.
_CLASSMATE_PALETTE = (*COLOURS.values(), (250, 250, 255), (30, 30, 30), (150, 160, 175))
# How far (RGB distance) a class-mate's largest part is from the subject's own: far enough that a
# class-mate never passes for the subject.
_CLASSMATE_MIN_DISTANCE = 120.0


def classmate_colours(name: str, seed: int) -> tuple[tuple[int, int, int], ...]:
    """The part colours of class-mate ``seed`` of subject ``name``: the same design in other colours.

    Each part takes a colour of the palette; the largest part (the one that carries the subject's look)
    takes one at least ``_CLASSMATE_MIN_DISTANCE`` from the subject's own, so every class-mate is
    another individual of the class, never the subject itself."""
    parts = _SUBJECT_DESIGNS[name][1]
    rng = random.Random(f"miniature/classmate/{name}/{seed}")
    largest = max(range(len(parts)), key=lambda i: parts[i][4])
    own = np.asarray(parts[largest][1], dtype=np.float32)
    far = [c for c in _CLASSMATE_PALETTE if np.linalg.norm(np.asarray(c) - own) >= _CLASSMATE_MIN_DISTANCE]
    return tuple(
        rng.choice(far) if i == largest else rng.choice(_CLASSMATE_PALETTE) for i in range(len(parts))
    )


@dataclass(frozen=True)
class SubjectScene:
    """A subject (a name of ``SUBJECT_NAMES``, or None for no subject) at ``position`` (a key of
    ``POSITIONS``) in ``style``, ``scale`` (its unit as a fraction of the side), and an optional world
    object in another cell (``distractor``).

    With ``classmate`` (a seed), the scene shows not the subject but another member of its class: the
    same design in :func:`classmate_colours`, prompted by the class noun alone. Class-mates are what the
    world's generators know of a class before DreamBooth, and what the subject judge must not mistake
    for the subject."""

    subject: str | None
    position: str
    style: StyleSpec
    scale: float = DEFAULT_SUBJECT_SCALE
    distractor: ObjectSpec | None = None
    classmate: int | None = None

    @property
    def prompt(self) -> str:
        """``"a sks robot at the top left"`` (+ ``" and "`` + the distractor's words); with no subject, the
        distractor's words alone; for a class-mate, ``"a robot at the top left"``."""
        parts = []
        if self.subject is not None:
            parts.append(_subject_words(self.subject, self.position, self.classmate is not None))
        if self.distractor is not None:
            parts.append(self.distractor.describe())
        return " and ".join(parts)


def subject_parts(
    name: str, center: tuple[float, float], scale: float, size: int, classmate: int | None = None
) -> list[tuple[str, tuple[int, int, int], float, float, float]]:
    """Where subject ``name``'s parts are drawn: ``(kind, colour, cx, cy, r)`` in pixels of a ``size`` image
    (in class-mate ``classmate``'s colours when given).

    The design's bounding box is centred on ``center`` (fractions of the side), then shifted so that the
    whole subject stays inside the frame with a pixel to spare.
    """
    left, top, right, bottom = subject_bounds(name)
    unit = scale * size
    # The point the design's offsets are measured from, such that the bounding box's centre is on `center`.
    ox = center[0] * size - (left + right) / 2 * unit
    oy = center[1] * size - (top + bottom) / 2 * unit
    margin = 1.0
    ox = min(max(ox, margin - left * unit), size - margin - right * unit)
    oy = min(max(oy, margin - top * unit), size - margin - bottom * unit)
    parts = _SUBJECT_DESIGNS[name][1]
    colours = [c for _, c, *_ in parts] if classmate is None else classmate_colours(name, classmate)
    return [
        (kind, colour, ox + dx * unit, oy + dy * unit, r * unit)
        for (kind, _, dx, dy, r), colour in zip(parts, colours, strict=True)
    ]


def _draw_subject(
    canvas: np.ndarray, name: str, center: tuple[float, float], scale: float, classmate: int | None = None
) -> None:
    size = canvas.shape[0]
    for kind, colour, cx, cy, r in subject_parts(name, center, scale, size, classmate):
        canvas[np.asarray(shape_mask(kind, cx, cy, r, size)) > 127] = colour


def cell_center(position: str) -> tuple[float, float]:
    """The centre of ``position``'s grid cell as fractions of the side: ``((col + .5) / 3, (row + .5) / 3)``."""
    col, row = POSITIONS[position]
    return (col + 0.5) / 3, (row + 0.5) / 3


def render_subject_scene(scene: SubjectScene, size: int = WORLD_IMAGE_SIZE) -> Image.Image:
    """Draw ``scene`` as a ``size x size`` RGB image: the style's background, the distractor as
    :func:`render` draws objects, then the subject (its own colours) on its cell."""
    if scene.distractor is not None:
        canvas = np.asarray(
            render(ContentSpec((scene.distractor,)), scene.style, size), dtype=np.float32
        ).copy()
    else:
        canvas = background(scene.style, size)
    if scene.subject is not None:
        _draw_subject(canvas, scene.subject, cell_center(scene.position), scene.scale, scene.classmate)
    return Image.fromarray(np.clip(canvas, 0, 255).round().astype(np.uint8), "RGB")


def sample_subject_scene(
    rng: random.Random,
    subjects: Sequence[str] = SUBJECT_NAMES,
    styles: Sequence[StyleSpec] = TRAIN_STYLES,
    distractor_share: float = 0.5,
    no_subject_share: float = 0.0,
    classmate_share: float = 0.0,
) -> SubjectScene:
    """A random subject scene drawn from ``rng`` (the same stream, the same scene).

    ``distractor_share`` of the scenes have a world object in another cell; ``no_subject_share`` have no
    subject, only a world object (so a judge can learn what "no subject" looks like); ``classmate_share``
    of the scenes with a subject show a class-mate of it instead (a random one of a million).
    """
    # Drawn only when asked for, so the stream (and every scene) without class-mates is unchanged.
    classmate = rng.randrange(10**6) if classmate_share and rng.random() < classmate_share else None
    no_subject = rng.random() < no_subject_share
    has_distractor = no_subject or rng.random() < distractor_share
    name = None if no_subject else rng.choice(list(subjects))
    position = rng.choice(sorted(POSITIONS))
    style = rng.choice(list(styles))
    scale = rng.uniform(*SCALE_RANGE)
    distractor = None
    if has_distractor:
        place = position if no_subject else rng.choice([p for p in sorted(POSITIONS) if p != position])
        distractor = ObjectSpec(
            rng.choice(OBJECT_KINDS), rng.choice(sorted(COLOURS)), place, rng.choice(sorted(SIZES))
        )
    return SubjectScene(name, position, style, scale, distractor, None if no_subject else classmate)


def classmate_scenes(
    seed: int, count: int, tag: str, subjects: Sequence[str] = SUBJECT_NAMES
) -> list[SubjectScene]:
    """``count`` scenes of class-mates of ``subjects`` in the training styles (half beside a world
    object), from their own stream: ``"a robot at the top left"`` in colours that are not the subject's."""
    rng = random.Random(f"miniature/classmates/{tag}/{seed}")
    return [sample_subject_scene(rng, subjects, classmate_share=1.0) for _ in range(count)]


# Where the instance views put the subject, in order: a user's 3-6 photos of a subject frame it
# differently, and at most six of the nine places are ever seen, so prompts at the other places test
# whether a tuned model places the subject where it never saw it.
INSTANCE_PLACES = ("center", "top left", "bottom right", "left", "top right", "bottom")


def instance_scenes(
    name: str, count: int = 4, seed: int = 0, size: int = WORLD_IMAGE_SIZE
) -> list[tuple[str, Image.Image]]:
    """DreamBooth instance views of subject ``name``: ``count`` (3-6) ``(prompt, image)`` pairs.

    View ``j`` puts the subject at ``INSTANCE_PLACES[j]`` (its prompt says so: ``"a sks robot in the
    center"``, ``"a sks robot at the top left"``, ...) at about the world's scale, with a little jitter of
    place and scale, on a light plain background that varies per view.

    Why not all centred: with every view in the center, DreamBooth bound the subject to that place. The
    tuned supervisor drew it for ``"... in the center"`` (0.75 of samples) and at other places in 0.06.
    With four views at four places it reached 1.0 at those places and 0.60 at the five it never saw.
    """
    if not 3 <= count <= 6:
        raise ValueError(f"count must be 3..6, got {count}")
    subject_token(name)  # validates the name
    views = []
    for j in range(count):
        # String seeds are hashed with SHA-512 by `random`, so views are stable across processes.
        rng = random.Random(f"miniature/subject-instance/{seed}/{name}/{j}")
        scale = DEFAULT_SUBJECT_SCALE * rng.uniform(0.9, 1.05)
        x, y = cell_center(INSTANCE_PLACES[j])
        center = (x + rng.uniform(-0.03, 0.03), y + rng.uniform(-0.03, 0.03))
        canvas = np.empty((size, size, 3), dtype=np.float32)
        canvas[:] = [rng.randint(215, 250) for _ in range(3)]
        _draw_subject(canvas, name, center, scale)
        image = Image.fromarray(canvas.round().astype(np.uint8), "RGB")
        views.append((_subject_words(name, INSTANCE_PLACES[j]), image))
    return views


NO_SUBJECT = len(SUBJECT_NAMES)  # the class of a cell with no subject


def subject_labels(scene: SubjectScene) -> list[int]:
    """Per grid cell (row-major, 9): the subject's index in ``SUBJECT_NAMES`` at its cell, ``NO_SUBJECT``
    elsewhere (and everywhere for a scene with no subject or with a class-mate: it is not the subject)."""
    labels = [NO_SUBJECT] * 9
    if scene.subject is not None and scene.classmate is None:
        labels[_cell(scene.position)] = SUBJECT_NAMES.index(scene.subject)
    return labels


class SubjectJudge(nn.Module):
    """Pixels ``(B, 3, 64, 64)`` in [-1, 1] -> per grid cell, logits over the subjects and "none".

    The content judge's trunk (an 8x8 feature map at 64 px) pooled to the 3x3 grid, a 1x1 head per cell.
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.trunk = _Trunk(width)
        self.pool = nn.AdaptiveAvgPool2d(3)
        self.head = nn.Conv2d(self.trunk.channels, NO_SUBJECT + 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, 9, len(SUBJECT_NAMES) + 1)``, cells row-major, the last class "no subject"."""
        return self.head(self.pool(self.trunk(x))).flatten(2).transpose(1, 2)

    @torch.no_grad()
    def predict(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 9)`` class per cell: an index of ``SUBJECT_NAMES``, or ``NO_SUBJECT``."""
        return self(pixels).argmax(-1)

    @torch.no_grad()
    def subject_present(self, pixels: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """``(B,)`` bool: subject ``names[i]`` is predicted in at least one cell of image ``i``."""
        expected = torch.tensor([SUBJECT_NAMES.index(n) for n in names])
        return (self.predict(pixels) == expected[:, None]).any(dim=1)

    @torch.no_grad()
    def subject_at(
        self, pixels: torch.Tensor, names: Sequence[str], positions: Sequence[str]
    ) -> torch.Tensor:
        """``(B,)`` bool: subject ``names[i]`` is predicted at the cell of ``positions[i]`` in image ``i``."""
        expected = torch.tensor([SUBJECT_NAMES.index(n) for n in names])
        cells = torch.tensor([_cell(p) for p in positions])
        predicted = self.predict(pixels).gather(1, cells[:, None])[:, 0]
        return predicted == expected


@dataclass
class SubjectJudgeConfig:
    """How the subject judge is trained on subject scenes."""

    num_images: int = option(8000, "training scenes (training styles, half with a world object beside)")
    steps: int = option(1500, "optimizer steps")
    batch_size: int = option(64, "images per step")
    lr: float = option(3e-3, "peak AdamW learning rate (one-cycle)")
    width: int = option(32, "base channel width of the CNN")
    seed: int = option(0, "seed of the training scenes and initialisation")
    no_subject_share: float = option(0.15, "share of training scenes with no subject (world objects only)")
    classmate_share: float = option(
        0.3, "share of subject scenes showing a class-mate instead (labelled no subject: not the subject)"
    )


def _subject_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def train_subject_judge(
    config: SubjectJudgeConfig, shuffled_labels: bool = False, vq: nn.Module | None = None
) -> tuple[SubjectJudge, dict[str, float]]:
    """Train a :class:`SubjectJudge` on ``config.num_images`` subject scenes in :data:`TRAIN_STYLES`, seen
    through the judges' corruptions (blur, noise, colour jitter); returns it and its stats (final loss,
    seconds). Torch's thread count is left as the caller set it.

    ``shuffled_labels`` permutes the labels across images: a control that has nothing to learn from.
    With ``vq`` (the world's VQGAN), every second image is its VQ reconstruction, as for the other
    judges: what the judge scores (supervisor samples, AR outputs) are decoded images.
    """
    start = time.perf_counter()
    rng = random.Random(f"miniature/subject-judge/train/{config.seed}")
    scenes = [
        sample_subject_scene(
            rng, no_subject_share=config.no_subject_share, classmate_share=config.classmate_share
        )
        for _ in range(config.num_images)
    ]
    pixels = to_tensor([render_subject_scene(s) for s in scenes])
    if vq is not None:
        pixels[1::2] = vq_round_trip(vq, pixels[1::2])
    labels = torch.tensor([subject_labels(s) for s in scenes])
    if shuffled_labels:
        labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(config.seed))]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        judge = SubjectJudge(config.width)
    # The other judges' loop (sampling, corruptions, one-cycle AdamW), with this judge's sizes.
    loop = JudgeTrainingConfig(
        num_images=config.num_images,
        steps=config.steps,
        batch_size=config.batch_size,
        lr=config.lr,
        width=config.width,
        seed=config.seed,
    )
    loss = _train(judge, _subject_loss, pixels, labels, loop)
    return judge, {"loss": loss, "seconds": time.perf_counter() - start}


def light_blur(pixels: torch.Tensor) -> torch.Tensor:
    """A 3x3 box blur (edges replicated) of ``(B, 3, H, W)`` pixels: a stand-in for a decoder's softness."""
    return F.avg_pool2d(F.pad(pixels, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


@torch.no_grad()
def subject_judge_accuracy(judge: SubjectJudge, seed: int = 0, count: int = 512) -> dict[str, float]:
    """The judge on held-out scenes (their own random stream, :data:`HELD_OUT_STYLES`, half with a world
    object): ``at_cell``, the share of ``count`` subject scenes whose subject is found at its cell;
    ``identity``, the share whose subject is found in any cell; ``false_positive``, the share of
    ``count // 2`` no-subject scenes where any cell is read as a subject; ``classmate_false_positive``, the
    share of ``count // 2`` class-mate scenes read as the subject they are a class-mate of. ``blurred_*``:
    the same on a light blur of the images."""
    rng = random.Random(f"miniature/subject-judge/held-out/{seed}")
    with_subject = [sample_subject_scene(rng, styles=HELD_OUT_STYLES) for _ in range(count)]
    without = [
        sample_subject_scene(rng, styles=HELD_OUT_STYLES, no_subject_share=1.0) for _ in range(count // 2)
    ]
    classmates = [
        sample_subject_scene(rng, styles=HELD_OUT_STYLES, classmate_share=1.0) for _ in range(count // 2)
    ]
    names = [s.subject for s in with_subject]
    positions = [s.position for s in with_subject]
    pixels = to_tensor([render_subject_scene(s) for s in with_subject])
    empty = to_tensor([render_subject_scene(s) for s in without])
    kin = to_tensor([render_subject_scene(s) for s in classmates])
    judge.eval()
    out = {}
    for prefix, transform in (("", lambda x: x), ("blurred_", light_blur)):
        x, e, k = transform(pixels), transform(empty), transform(kin)
        out[f"{prefix}at_cell"] = float(judge.subject_at(x, names, positions).float().mean())
        out[f"{prefix}identity"] = float(judge.subject_present(x, names).float().mean())
        out[f"{prefix}false_positive"] = float((judge.predict(e) != NO_SUBJECT).any(dim=1).float().mean())
        kin_names = [s.subject for s in classmates]
        out[f"{prefix}classmate_false_positive"] = float(judge.subject_present(k, kin_names).float().mean())
    return out


__all__ = [
    "DEFAULT_SUBJECT_SCALE",
    "INSTANCE_PLACES",
    "NO_SUBJECT",
    "SCALE_RANGE",
    "SubjectJudge",
    "SubjectJudgeConfig",
    "SubjectScene",
    "cell_center",
    "classmate_colours",
    "classmate_scenes",
    "instance_scenes",
    "light_blur",
    "render_subject_scene",
    "sample_subject_scene",
    "subject_judge_accuracy",
    "subject_labels",
    "subject_parts",
    "subject_token",
    "train_subject_judge",
]

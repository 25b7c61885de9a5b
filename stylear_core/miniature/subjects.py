"""Subjects in the miniature world: scenes that place a procedural subject in a cell, and its judge.

A subject scene is one procedural subject (:mod:`stylear_core.data.synthetic_subjects`: a robot, a
mushroom, ... with a rare token, ``"a sks robot"``) at one of the nine named positions, drawn on a
style's background, optionally beside one ordinary world object (a *distractor*) in another cell::

    scene = sample_subject_scene(random.Random(0))
    scene.prompt                     # "a sks robot at the top left and a small red circle at the bottom"
    render_subject_scene(scene, 64)  # PIL image

The subject keeps its own colours under every palette (they are its identity; the palette tones
world objects only), and it is sized to fill about one cell of the 3x3 grid, so the judge's
per-cell reading and the prompt's placement words mean the same cell.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from stylear_core.data.synthetic import (
    COLOURS,
    OBJECT_KINDS,
    POSITIONS,
    SIZES,
    ContentSpec,
    ObjectSpec,
    StyleSpec,
    background,
    render,
    shape_mask,
)
from stylear_core.data.synthetic_subjects import _SUBJECT_DESIGNS, SUBJECT_NAMES, subject_bounds
from stylear_core.miniature.data import TRAIN_STYLES, WORLD_IMAGE_SIZE

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


def _place_words(position: str) -> str:
    # The same placement words as ObjectSpec.describe, so subject and object prompts read alike.
    return "in the center" if position == "center" else f"at the {position}"


@dataclass(frozen=True)
class SubjectScene:
    """A subject (a name of ``SUBJECT_NAMES``, or None for no subject) at ``position`` (a key of
    ``POSITIONS``) in ``style``, ``scale`` (its unit as a fraction of the side), and an optional world
    object in another cell (``distractor``)."""

    subject: str | None
    position: str
    style: StyleSpec
    scale: float = DEFAULT_SUBJECT_SCALE
    distractor: ObjectSpec | None = None

    @property
    def prompt(self) -> str:
        """``"a sks robot at the top left"`` (+ ``" and "`` + the distractor's words); with no subject, the
        distractor's words alone."""
        parts = []
        if self.subject is not None:
            parts.append(f"a {subject_token(self.subject)} {self.subject} {_place_words(self.position)}")
        if self.distractor is not None:
            parts.append(self.distractor.describe())
        return " and ".join(parts)


def subject_parts(
    name: str, center: tuple[float, float], scale: float, size: int
) -> list[tuple[str, tuple[int, int, int], float, float, float]]:
    """Where subject ``name``'s parts are drawn: ``(kind, colour, cx, cy, r)`` in pixels of a ``size`` image.

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
    return [
        (kind, colour, ox + dx * unit, oy + dy * unit, r * unit)
        for kind, colour, dx, dy, r in _SUBJECT_DESIGNS[name][1]
    ]


def _draw_subject(canvas: np.ndarray, name: str, center: tuple[float, float], scale: float) -> None:
    size = canvas.shape[0]
    for kind, colour, cx, cy, r in subject_parts(name, center, scale, size):
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
        _draw_subject(canvas, scene.subject, cell_center(scene.position), scene.scale)
    return Image.fromarray(np.clip(canvas, 0, 255).round().astype(np.uint8), "RGB")


def sample_subject_scene(
    rng: random.Random,
    subjects: Sequence[str] = SUBJECT_NAMES,
    styles: Sequence[StyleSpec] = TRAIN_STYLES,
    distractor_share: float = 0.5,
    no_subject_share: float = 0.0,
) -> SubjectScene:
    """A random subject scene drawn from ``rng`` (the same stream, the same scene).

    ``distractor_share`` of the scenes have a world object in another cell; ``no_subject_share`` have no
    subject, only a world object (so a judge can learn what "no subject" looks like).
    """
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
    return SubjectScene(name, position, style, scale, distractor)


def instance_scenes(
    name: str, count: int = 4, seed: int = 0, size: int = WORLD_IMAGE_SIZE
) -> list[tuple[str, Image.Image]]:
    """DreamBooth instance views of subject ``name``: ``count`` (3-6) ``(prompt, image)`` pairs.

    The subject is in the center cell (its prompt says so: ``"a sks robot in the center"``) at about the
    world's scale, with a little jitter of place and scale, on a light plain background that varies per
    view, as :func:`~stylear_core.data.synthetic_subjects.procedural_subjects` draws its views.
    """
    if not 3 <= count <= 6:
        raise ValueError(f"count must be 3..6, got {count}")
    subject_token(name)  # validates the name
    views = []
    for j in range(count):
        # String seeds are hashed with SHA-512 by `random`, so views are stable across processes.
        rng = random.Random(f"miniature/subject-instance/{seed}/{name}/{j}")
        scale = DEFAULT_SUBJECT_SCALE * rng.uniform(0.9, 1.05)
        center = (0.5 + rng.uniform(-0.03, 0.03), 0.5 + rng.uniform(-0.03, 0.03))
        canvas = np.empty((size, size, 3), dtype=np.float32)
        canvas[:] = [rng.randint(215, 250) for _ in range(3)]
        _draw_subject(canvas, name, center, scale)
        views.append(
            (
                f"a {subject_token(name)} {name} {_place_words('center')}",
                Image.fromarray(canvas.round().astype(np.uint8), "RGB"),
            )
        )
    return views

"""Procedural subjects for subject-driven generation: fixed designs drawn with Pillow, deterministic by seed.

A subject is a small figure of a few coloured parts (a robot, a mushroom, ...) with a rare identifier
token and a class noun, the way DreamBooth names its subjects (``"a sks robot"``)::

    procedural_subjects(3, images_per_subject=4, size=64, seed=0)  # [Subject], 3-6 views each
    render_subject("robot", 64)                                    # one view

The parts are drawn with the shapes of the procedural style set (:mod:`stylear_core.data.synthetic`).
Views are drawn from per-view random streams (``seed``, subject, index), as the style set's records are.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image

from stylear_core.data.images import encode_png
from stylear_core.data.synthetic import shape_mask

# Procedural subjects for subject-driven generation: fixed designs, each a few parts.
# Part: (shape kind, colour, dx, dy, half-extent), offsets and extents in units of the subject's scale.
_SUBJECT_DESIGNS: dict[str, tuple[str, tuple[tuple[str, tuple[int, int, int], float, float, float], ...]]] = {
    "robot": (
        "sks",
        (
            ("square", (150, 160, 175), 0.0, 0.35, 0.45),
            ("square", (120, 130, 150), 0.0, -0.45, 0.3),
            ("circle", (230, 40, 40), 0.0, -0.95, 0.1),
            ("circle", (40, 220, 240), -0.12, -0.48, 0.07),
            ("circle", (40, 220, 240), 0.12, -0.48, 0.07),
        ),
    ),
    "mushroom": (
        "zwx",
        (
            ("square", (240, 230, 205), 0.0, 0.45, 0.22),
            ("circle", (200, 30, 40), 0.0, -0.1, 0.55),
            ("circle", (255, 255, 255), -0.25, -0.3, 0.09),
            ("circle", (255, 255, 255), 0.2, -0.15, 0.1),
        ),
    ),
    "snowman": (
        "qlv",
        (
            ("circle", (250, 250, 255), 0.0, 0.45, 0.45),
            ("circle", (250, 250, 255), 0.0, -0.3, 0.32),
            ("triangle", (250, 130, 20), 0.1, -0.3, 0.07),
            ("square", (30, 30, 30), 0.0, -0.75, 0.18),
        ),
    ),
    "rocket": (
        "vfh",
        (
            ("square", (220, 220, 230), 0.0, 0.1, 0.3),
            ("triangle", (210, 40, 60), 0.0, -0.5, 0.3),
            ("circle", (60, 140, 230), 0.0, 0.0, 0.13),
            ("triangle", (250, 180, 20), 0.0, 0.65, 0.2),
        ),
    ),
    "cat": (
        "pdj",
        (
            ("circle", (240, 160, 70), 0.0, 0.1, 0.5),
            ("triangle", (240, 160, 70), -0.35, -0.4, 0.2),
            ("triangle", (240, 160, 70), 0.35, -0.4, 0.2),
            ("circle", (30, 120, 40), -0.18, 0.0, 0.08),
            ("circle", (30, 120, 40), 0.18, 0.0, 0.08),
        ),
    ),
    "tree": (
        "kbt",
        (
            ("square", (110, 70, 40), 0.0, 0.6, 0.15),
            ("triangle", (30, 130, 50), 0.0, -0.05, 0.55),
            ("triangle", (40, 160, 60), 0.0, -0.45, 0.4),
        ),
    ),
}
SUBJECT_NAMES = tuple(_SUBJECT_DESIGNS)


def subject_bounds(name: str) -> tuple[float, float, float, float]:
    """``(left, top, right, bottom)`` of subject ``name``'s design in units of its scale, relative to the
    point it is drawn around (each part spans its offset +- its half-extent)."""
    if name not in _SUBJECT_DESIGNS:
        raise ValueError(f"unknown subject {name!r} (known: {SUBJECT_NAMES})")
    parts = _SUBJECT_DESIGNS[name][1]
    return (
        min(dx - r for _, _, dx, _, r in parts),
        min(dy - r for _, _, _, dy, r in parts),
        max(dx + r for _, _, dx, _, r in parts),
        max(dy + r for _, _, _, dy, r in parts),
    )


@dataclass(frozen=True)
class Subject:
    """A procedural subject: a rare identifier token, its class noun, and instance images (PNG bytes).

    The DreamBooth-style prompt for it is :attr:`prompt` (``"a sks robot"``).
    """

    name: str
    token: str
    class_noun: str
    images: tuple[bytes, ...]

    @property
    def prompt(self) -> str:
        """``"a <token> <class noun>"``."""
        return f"a {self.token} {self.class_noun}"


def render_subject(
    name: str,
    size: int = 64,
    scale: float = 0.3,
    center: tuple[float, float] = (0.5, 0.5),
    background: tuple[int, int, int] = (235, 235, 235),
) -> Image.Image:
    """Draw subject ``name`` at ``center`` (fractions of the side), about ``scale`` x side tall."""
    if name not in _SUBJECT_DESIGNS:
        raise ValueError(f"unknown subject {name!r} (known: {SUBJECT_NAMES})")
    canvas = Image.new("RGB", (size, size), background)
    unit = scale * size
    cx, cy = center[0] * size, center[1] * size
    for kind, colour, dx, dy, r in _SUBJECT_DESIGNS[name][1]:
        mask = shape_mask(kind, cx + dx * unit, cy + dy * unit, r * unit, size)
        canvas.paste(colour, mask=mask)
    return canvas


def procedural_subjects(
    count: int = 3, images_per_subject: int = 4, size: int = 64, seed: int = 0
) -> list[Subject]:
    """The first ``count`` procedural subjects, each with ``images_per_subject`` (3-6) instance views.

    Views vary position, scale and a light background colour; the subject's design is fixed.
    ``size`` is the image side in pixels; ``seed`` fixes every view.
    """
    if not 3 <= images_per_subject <= 6:
        raise ValueError(f"images_per_subject must be 3..6, got {images_per_subject}")
    if count > len(SUBJECT_NAMES):
        raise ValueError(f"only {len(SUBJECT_NAMES)} subjects exist, asked for {count}")
    subjects = []
    for name in SUBJECT_NAMES[:count]:
        images = []
        for j in range(images_per_subject):
            # String seeds are hashed with SHA-512 by `random`, so views are stable across processes.
            rng = random.Random(f"{seed}/subject/{name}/{j}")
            scale = rng.uniform(0.28, 0.38)
            center = (rng.uniform(0.4, 0.6), rng.uniform(0.45, 0.55))
            background = tuple(rng.randint(200, 250) for _ in range(3))
            images.append(encode_png(render_subject(name, size, scale, center, background)))
        subjects.append(Subject(name, _SUBJECT_DESIGNS[name][0], name, tuple(images)))
    return subjects


__all__ = ["SUBJECT_NAMES", "Subject", "procedural_subjects", "render_subject", "subject_bounds"]

"""A procedural style dataset for the demo and the tests: drawn with Pillow, deterministic by seed.

An image is *content* (what the prompt says: a few coloured objects at named places and sizes)
drawn in a *style* (what the prompt does not say: a palette, a background texture and a stroke
kind). Content and style vary independently, so a model can be checked for taking content from the
prompt and style from a reference::

    data = SyntheticStyleSet(seed=0, size=64)
    data.raw_pairs(8)               # [{id, prompt, image}], random styles (stylear.raw/1 rows)
    data.style_references(4)        # {style_id: PNG of that style on content of its own}
    data.stylization_requests(8)    # [{id, prompt, style_ref, style_image, seed}] for the stylizer
    data.stylized_pairs(8)          # the same requests drawn exactly: the ideal stylizer's output
    render(content, style, 64)      # any (content, style) pair

Records are drawn from per-record random streams (``seed``, stream name, index), so the first
``n`` records do not depend on how many were asked for, or on what was asked for before.
Procedural subjects for subject-driven generation, drawn with the same shapes, are
:mod:`stylear_core.data.synthetic_subjects`.
"""

from __future__ import annotations

import io
import itertools
import math
import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from stylear_core.data.images import encode_png

OBJECT_KINDS = ("circle", "square", "triangle", "star", "house", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
}
# Named places on a 3x3 grid -> (column, row) and how a prompt says them.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0),
    "top": (1, 0),
    "top right": (2, 0),
    "left": (0, 1),
    "center": (1, 1),
    "right": (2, 1),
    "bottom left": (0, 2),
    "bottom": (1, 2),
    "bottom right": (2, 2),
}
SIZES: dict[str, float] = {"small": 0.2, "large": 0.32}  # object extent as a fraction of the image side

TEXTURES = ("stripes", "dots", "gradient", "checker", "noise")
STROKES = ("outline", "filled", "hatched")


@dataclass(frozen=True)
class Palette:
    """Background colours, an ink colour (outlines), and how object colours are toned (towards ``tone``)."""

    background: tuple[int, int, int]
    background_alt: tuple[int, int, int]
    ink: tuple[int, int, int]
    tone: tuple[int, int, int] | None = None
    tone_amount: float = 0.0
    greyscale: bool = False

    def object_colour(self, rgb: tuple[int, int, int]) -> tuple[int, int, int]:
        """The colour an object named ``rgb`` is drawn with under this palette (hue kept recognisable)."""
        colour = np.asarray(rgb, dtype=np.float32)
        if self.greyscale:
            grey = float(colour @ np.asarray([0.299, 0.587, 0.114], dtype=np.float32))
            colour = 0.6 * np.full(3, grey, dtype=np.float32) + 0.4 * colour
        if self.tone is not None:
            colour = (1 - self.tone_amount) * colour + self.tone_amount * np.asarray(
                self.tone, dtype=np.float32
            )
        return tuple(int(round(c)) for c in np.clip(colour, 0, 255))


PALETTES: dict[str, Palette] = {
    "vivid": Palette((245, 245, 240), (200, 205, 215), (20, 20, 20)),
    "pastel": Palette(
        (250, 232, 240), (222, 240, 250), (120, 110, 140), tone=(255, 255, 255), tone_amount=0.5
    ),
    "night": Palette((18, 22, 48), (52, 62, 112), (240, 240, 200), tone=(30, 30, 90), tone_amount=0.25),
    "sepia": Palette((232, 212, 170), (190, 160, 110), (80, 50, 20), tone=(150, 110, 60), tone_amount=0.35),
    "neon": Palette((8, 8, 12), (48, 0, 64), (0, 255, 200)),
    "mono": Palette((250, 250, 250), (170, 170, 170), (0, 0, 0), greyscale=True),
}


def place_words(position: str) -> str:
    """How a prompt says a named position: ``"in the center"``, else ``"at the <position>"``."""
    return "in the center" if position == "center" else f"at the {position}"


@dataclass(frozen=True)
class ObjectSpec:
    """One object of the content: kind (``OBJECT_KINDS``), colour name, named position, size name."""

    kind: str
    colour: str
    position: str
    size: str

    def describe(self) -> str:
        """Prompt words for this object, e.g. ``"a large red circle at the top left"``."""
        return f"a {self.size} {self.colour} {self.kind} {place_words(self.position)}"


@dataclass(frozen=True)
class ContentSpec:
    """What an image shows: one or more objects at distinct positions."""

    objects: tuple[ObjectSpec, ...]

    @property
    def prompt(self) -> str:
        """The caption of this content, objects joined by "and"."""
        return " and ".join(obj.describe() for obj in self.objects)


@dataclass(frozen=True)
class StyleSpec:
    """How an image is drawn: palette name (``PALETTES``), background texture, stroke kind."""

    palette: str
    texture: str
    stroke: str

    @property
    def style_id(self) -> str:
        """A stable id, ``palette.texture.stroke``."""
        return f"{self.palette}.{self.texture}.{self.stroke}"

    @classmethod
    def from_id(cls, style_id: str) -> StyleSpec:
        """Inverse of :attr:`style_id`."""
        palette, texture, stroke = style_id.split(".")
        return cls(palette, texture, stroke)

    def describe(self) -> str:
        """Words for the style (not used in content prompts; for reports and style-in-text baselines)."""
        return f"{self.palette} palette, {self.texture} background, {self.stroke} shapes"


ALL_STYLES: tuple[StyleSpec, ...] = tuple(
    StyleSpec(p, t, s) for p, t, s in itertools.product(PALETTES, TEXTURES, STROKES)
)


def caption_words() -> tuple[str, ...]:
    """Every word a caption of this generator can use (:meth:`ObjectSpec.describe`, "and"), and the style
    names (palettes, textures, strokes), in a fixed order."""
    words = ["a", "in", "the", "at", "and", *SIZES, *COLOURS, *OBJECT_KINDS]
    words += [w for place in POSITIONS for w in place.split()]
    words += [*PALETTES, *TEXTURES, *STROKES]
    return tuple(dict.fromkeys(words))


def _background(style: StyleSpec, size: int) -> np.ndarray:
    palette = PALETTES[style.palette]
    c0 = np.asarray(palette.background, dtype=np.float32)
    c1 = np.asarray(palette.background_alt, dtype=np.float32)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    period = max(4, size // 8)
    if style.texture == "stripes":
        t = (((x + y) // (period / 2)) % 2).astype(np.float32)
    elif style.texture == "dots":
        cx = (x % period) - period / 2
        cy = (y % period) - period / 2
        t = (cx**2 + cy**2 <= (period / 4) ** 2).astype(np.float32)
    elif style.texture == "gradient":
        t = y / max(size - 1, 1)
    elif style.texture == "checker":
        t = (((x // period) + (y // period)) % 2).astype(np.float32)
    elif style.texture == "noise":
        # The noise is part of the style: the same style always has the same noise field.
        rng = np.random.default_rng(zlib.crc32(style.style_id.encode()))
        coarse = rng.random((max(2, size // 4), max(2, size // 4)), dtype=np.float32)
        t = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR))
        t = t.astype(np.float32) / 255.0
    else:
        raise ValueError(f"unknown texture {style.texture!r} (known: {TEXTURES})")
    return c0 * (1 - t[..., None]) + c1 * t[..., None]


def background(style: StyleSpec, size: int) -> np.ndarray:
    """The background of ``style`` alone, ``(size, size, 3)`` float RGB in 0..255 (what :func:`render` draws
    objects on)."""
    return _background(style, size)


def _star_points(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        radius = r if i % 2 == 0 else r * 0.45
        angle = -math.pi / 2 + i * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def shape_mask(kind: str, cx: float, cy: float, r: float, size: int) -> Image.Image:
    """Mode-L mask (255 inside) of an object of half-extent ``r`` centred at ``(cx, cy)``; ``kind`` is one of
    :data:`OBJECT_KINDS`."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif kind == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=255)
    elif kind == "star":
        draw.polygon(_star_points(cx, cy, r), fill=255)
    elif kind == "house":
        draw.rectangle((cx - 0.8 * r, cy - 0.1 * r, cx + 0.8 * r, cy + r), fill=255)
        draw.polygon([(cx - r, cy - 0.1 * r), (cx, cy - r), (cx + r, cy - 0.1 * r)], fill=255)
    elif kind == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=255)
    else:
        raise ValueError(f"unknown object kind {kind!r} (known: {OBJECT_KINDS})")
    return mask


def _paint(
    canvas: np.ndarray,
    mask: Image.Image,
    colour: tuple[int, int, int],
    stroke: str,
    ink: tuple[int, int, int],
):
    size = canvas.shape[0]
    inside = np.asarray(mask) > 127
    width = max(1, size // 32)
    eroded = np.asarray(mask.filter(ImageFilter.MinFilter(2 * width + 1))) > 127
    edge = inside & ~eroded
    if stroke == "filled":
        canvas[inside] = colour
        canvas[edge] = ink
    elif stroke == "outline":
        canvas[edge] = colour
    elif stroke == "hatched":
        y, x = np.mgrid[0:size, 0:size]
        period = max(3, size // 16)
        hatch = ((x - y) % period) < max(1, period // 3)
        canvas[inside & hatch] = colour
        canvas[edge] = colour
    else:
        raise ValueError(f"unknown stroke {stroke!r} (known: {STROKES})")


def render(content: ContentSpec, style: StyleSpec, size: int = 64) -> Image.Image:
    """Draw ``content`` in ``style`` as a ``size x size`` RGB image (same inputs, same pixels)."""
    palette = PALETTES[style.palette]
    canvas = _background(style, size)
    cell = size / 3
    for obj in content.objects:
        col, row = POSITIONS[obj.position]
        r = SIZES[obj.size] * size / 2
        # Keep objects and their strokes inside the frame: an edge on the border would not be drawn.
        margin = r + 2 * max(1, size // 32) + 1
        cx = min(max((col + 0.5) * cell, margin), size - margin)
        cy = min(max((row + 0.5) * cell, margin), size - margin)
        mask = shape_mask(obj.kind, cx, cy, r, size)
        _paint(canvas, mask, palette.object_colour(COLOURS[obj.colour]), style.stroke, palette.ink)
    return Image.fromarray(np.clip(canvas, 0, 255).round().astype(np.uint8), "RGB")


def sample_content(
    rng: random.Random, max_objects: int = 2, kinds: Sequence[str] = OBJECT_KINDS
) -> ContentSpec:
    """A random content of 1..``max_objects`` objects at distinct positions, drawn from ``rng``."""
    count = rng.randint(1, max_objects)
    positions = rng.sample(sorted(POSITIONS), count)
    objects = tuple(
        ObjectSpec(rng.choice(list(kinds)), rng.choice(sorted(COLOURS)), pos, rng.choice(sorted(SIZES)))
        for pos in positions
    )
    return ContentSpec(objects)


def corrupt_bytes(kind: str = "truncated", seed: int = 0) -> bytes:
    """Bytes that are not a decodable image, for error-path tests.

    ``"truncated"``: the first part of a valid PNG; ``"random"``: random bytes; ``"empty"``: ``b""``;
    ``"header"``: a PNG signature followed by garbage.
    """
    rng = np.random.default_rng(seed)
    if kind == "empty":
        return b""
    if kind == "random":
        return rng.integers(0, 256, size=512, dtype=np.uint8).tobytes()
    png = encode_png(Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)))
    if kind == "truncated":
        return png[: len(png) // 2]
    if kind == "header":
        return png[:8] + rng.integers(0, 256, size=256, dtype=np.uint8).tobytes()
    raise ValueError(f"unknown corruption {kind!r} (known: truncated, random, empty, header)")


def png_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` of encoded image bytes, without decoding the pixels."""
    with Image.open(io.BytesIO(data)) as img:
        return img.size


class SyntheticStyleSet:
    """Deterministic procedural style data (see the module docstring): ``seed`` fixes every record.

    ``size`` is the image side in pixels.

    ``styles`` is every (palette, texture, stroke) combination, in an order shuffled by ``seed``.
    """

    def __init__(self, seed: int = 0, size: int = 64, max_objects: int = 2) -> None:
        self.seed = seed
        self.size = size
        self.max_objects = max_objects
        styles = list(ALL_STYLES)
        random.Random(f"{seed}/styles").shuffle(styles)
        self.styles: tuple[StyleSpec, ...] = tuple(styles)

    def _rng(self, stream: str, index: int) -> random.Random:
        # String seeds are hashed with SHA-512 by `random`, so streams are stable across processes.
        return random.Random(f"{self.seed}/{stream}/{index}")

    def content(self, stream: str, index: int) -> ContentSpec:
        """The content of record ``index`` of ``stream`` (the same every time)."""
        return sample_content(self._rng(stream, index), self.max_objects)

    def style(self, index: int) -> StyleSpec:
        """The ``index``-th style (cycling through :attr:`styles`)."""
        return self.styles[index % len(self.styles)]

    def reference_content(self, style: StyleSpec) -> ContentSpec:
        """The content a style's reference image shows: fixed per style, one object."""
        return sample_content(self._rng(f"reference/{style.style_id}", 0), max_objects=1)

    def style_reference(self, style: StyleSpec) -> Image.Image:
        """The reference image of ``style``: its own content drawn in that style."""
        return render(self.reference_content(style), style, self.size)

    def style_references(self, count: int) -> dict[str, bytes]:
        """``{style_id: PNG bytes}`` for the first ``count`` styles."""
        return {
            s.style_id: encode_png(self.style_reference(s)) for s in (self.style(i) for i in range(count))
        }

    def raw_pairs(self, count: int) -> list[dict]:
        """``count`` raw rows ``{id, prompt, image}`` (``stylear.raw/1``), each in a random style."""
        rows = []
        for i in range(count):
            rng = self._rng("raw", i)
            content = sample_content(rng, self.max_objects)
            style = rng.choice(ALL_STYLES)
            rows.append(
                {
                    "id": f"raw-{self.seed}-{i:06d}",
                    "prompt": content.prompt,
                    "image": self._png(content, style),
                }
            )
        return rows

    def _stylized_spec(self, index: int, num_styles: int) -> tuple[ContentSpec, StyleSpec, int]:
        rng = self._rng("stylized", index)
        style = self.style(rng.randrange(num_styles))
        reference = self.reference_content(style)
        content = sample_content(rng, self.max_objects)
        while content == reference:  # the target must not repeat the reference's content
            content = sample_content(rng, self.max_objects)
        return content, style, rng.randrange(2**31)

    def stylization_requests(self, count: int, num_styles: int = 8) -> list[dict]:
        """``count`` stylizer inputs ``{id, prompt, style_ref, style_image, seed}`` (``num_styles`` styles).

        ``style_image`` is the style's reference (PNG), whose content differs from the prompt's.
        """
        rows = []
        for i in range(count):
            content, style, seed = self._stylized_spec(i, num_styles)
            rows.append(
                {
                    "id": f"sty-{self.seed}-{i:06d}",
                    "prompt": content.prompt,
                    "style_ref": style.style_id,
                    "style_image": encode_png(self.style_reference(style)),
                    "seed": seed,
                }
            )
        return rows

    def stylized_pairs(self, count: int, num_styles: int = 8) -> list[dict]:
        """An ideal stylizer's output for :meth:`stylization_requests`: ``{id, prompt, image, style_ref, seed}``.

        Each target is the request's content drawn exactly in the reference's style.
        """
        rows = []
        for i in range(count):
            content, style, seed = self._stylized_spec(i, num_styles)
            rows.append(
                {
                    "id": f"sty-{self.seed}-{i:06d}",
                    "prompt": content.prompt,
                    "image": self._png(content, style),
                    "style_ref": style.style_id,
                    "seed": seed,
                }
            )
        return rows

    def _png(self, content: ContentSpec, style: StyleSpec) -> bytes:
        return encode_png(render(content, style, self.size))

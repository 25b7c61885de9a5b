"""The miniature world's data: which styles train and which are held out, and its token rows.

Of the 90 procedural styles (6 palettes x 5 textures x 3 strokes), :data:`HELD_OUT_STYLES` (12) are
never drawn for pretraining, SFT or preference pairs. They are new *combinations*: each of their
(palette, texture), (palette, stroke) and (texture, stroke) pairs also occurs among the training
styles, so a model that reads palette, texture and stroke off the style tokens can draw them, and one
that memorised whole styles cannot.

A scene of the world is one object (kind, colour, named position, size) drawn in a style, at 64 px.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from stylear_core.data.images import encode_png
from stylear_core.data.layout import ImageTokenLayout
from stylear_core.data.synthetic import (
    ALL_STYLES,
    PALETTES,
    STROKES,
    TEXTURES,
    ContentSpec,
    StyleSpec,
    render,
    sample_content,
)
from stylear_core.data.tokenizer import PromptTokenizer, style_prompt_ids, text_prompt_ids
from stylear_core.models.vqgan import ChameleonVQGAN, encode_images

WORLD_IMAGE_SIZE = 64


def _held_out() -> tuple[StyleSpec, ...]:
    palettes = list(PALETTES)
    held = []
    for i, palette in enumerate(palettes):
        held.append(StyleSpec(palette, TEXTURES[i % len(TEXTURES)], STROKES[i % len(STROKES)]))
        held.append(StyleSpec(palette, TEXTURES[(i + 2) % len(TEXTURES)], STROKES[(i + 1) % len(STROKES)]))
    return tuple(held)


HELD_OUT_STYLES: tuple[StyleSpec, ...] = _held_out()
TRAIN_STYLES: tuple[StyleSpec, ...] = tuple(s for s in ALL_STYLES if s not in HELD_OUT_STYLES)


def scenes(
    seed: int, count: int, styles: Sequence[StyleSpec], stream: str, max_objects: int = 1
) -> list[tuple[ContentSpec, StyleSpec]]:
    """``count`` (content, style) scenes drawn from ``styles`` by the random stream ``(seed, stream)``."""
    rng = random.Random(f"miniature/{stream}/{seed}")
    return [(sample_content(rng, max_objects), rng.choice(list(styles))) for _ in range(count)]


def reference_for(style: StyleSpec, avoid: ContentSpec, seed: int) -> tuple[ContentSpec, Image.Image]:
    """A style reference: ``style`` drawn on a content of its own whose object differs in kind and place
    from ``avoid`` (so content copied from the reference is visible as leakage)."""
    rng = random.Random(f"miniature/reference/{seed}/{style.style_id}")
    taken_kinds = {o.kind for o in avoid.objects}
    taken_places = {o.position for o in avoid.objects}
    while True:
        content = sample_content(rng, 1)
        obj = content.objects[0]
        if obj.kind not in taken_kinds and obj.position not in taken_places:
            return content, render(content, style, WORLD_IMAGE_SIZE)


@torch.no_grad()
def token_rows(
    items: Sequence[tuple[ContentSpec, StyleSpec]],
    vq: ChameleonVQGAN,
    layout: ImageTokenLayout,
    tokenizer: PromptTokenizer,
    num_style_tokens: int,
    id_prefix: str,
    batch_size: int = 64,
    draw: Callable[[Any], tuple[str, Image.Image]] | None = None,
) -> list[dict]:
    """Token-shard rows (``stylear.token_shards/2``) of the scenes: prompt ids with ``num_style_tokens``
    placeholders (0: the plain text prompt), image tokens by ``vq``, the PNG of the image.

    ``draw`` turns an item into its ``(prompt, image)``; by default items are ``(content, style)`` scenes
    drawn by :func:`render`."""
    size = WORLD_IMAGE_SIZE
    draw = draw or (lambda item: (item[0].prompt, render(item[0], item[1], size)))
    rows = []
    for start in range(0, len(items), batch_size):
        pairs = [draw(item) for item in items[start : start + batch_size]]
        images = [image for _, image in pairs]
        tokens = layout.encode(encode_images(vq, images, size))
        for i, (prompt, image) in enumerate(pairs):
            ids = (
                style_prompt_ids(tokenizer, prompt, num_style_tokens, size, size)
                if num_style_tokens
                else text_prompt_ids(tokenizer, prompt, size, size)
            )
            rows.append(
                {
                    "id": f"{id_prefix}-{start + i:06d}",
                    "prompt": prompt,
                    "prompt_ids": ids,
                    "image_tokens": tokens[i].tolist(),
                    "height": size,
                    "width": size,
                    "source": "stylized" if num_style_tokens else "raw",
                    "image": encode_png(image),
                }
            )
    return rows


__all__ = [
    "HELD_OUT_STYLES",
    "TRAIN_STYLES",
    "WORLD_IMAGE_SIZE",
    "reference_for",
    "scenes",
    "token_rows",
]

"""Condition images in a prompt: an image's FlexAR tokens where the prompt's ``<image>`` placeholder stands.

StyleAR's release controls layout (depth maps, ...) with a condition image. Its second template says
``... according to the provided image <|image|> and according to my instruction: ...`` and its
conversation processor puts the image's tokens where the marker stands: the same Lumina-mGPT layout
the model writes images in (:class:`~stylear_core.data.layout.ImageTokenLayout`: image start, grid
sizes, rows closed by the new-line token, image end). Here the marker is the vocabulary's ``<image>``
id (:attr:`TokenVocab.image_placeholder`), which the prompt builders write with ``condition=True``
(:func:`~stylear_core.data.tokenizer.style_prompt_ids`); :func:`splice_condition_tokens` replaces it
with the tokens.

:func:`encode_image_tokens` is the one way an image becomes tokens: curation's target images and
condition images, and condition images at inference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import nn

from stylear_core.data.images import center_crop_resize, to_tensor
from stylear_core.data.layout import ImageTokenLayout, TokenVocab


@torch.inference_mode()
def encode_image_tokens(
    vq: nn.Module, images: Sequence[Image.Image], layout: ImageTokenLayout, batch_size: int = 16
) -> torch.Tensor:
    """PIL images -> token ids ``(B, layout.num_tokens)`` on the CPU.

    Each image is centre-cropped and resized to the layout's pixel size (unless it has that size), the
    VQGAN encodes ``batch_size`` images per pass on its own device and dtype, and the codes are laid out.
    """
    if not images:
        raise ValueError("no images to encode")
    pixels_per_code = layout.vocab.pixels_per_latent
    height, width = layout.h_latent * pixels_per_code, layout.w_latent * pixels_per_code
    param = next(vq.parameters())
    chunks = []
    for start in range(0, len(images), batch_size):
        part = [
            im if im.size == (width, height) else center_crop_resize(im.convert("RGB"), height, width)
            for im in images[start : start + batch_size]
        ]
        pixels = to_tensor(part).to(device=param.device, dtype=param.dtype)
        chunks.append(vq.encode(pixels).cpu())
    return layout.encode(torch.cat(chunks))


def check_condition_tokens(tokens: Sequence[int], vocab: TokenVocab) -> ImageTokenLayout:
    """The layout of ``tokens`` if they are one well-formed image, else :class:`LayoutError` saying where."""
    ids = torch.as_tensor([int(t) for t in tokens], dtype=torch.long)
    layout = ImageTokenLayout.parse(ids, vocab)
    layout.decode(ids)  # every forced token in place, every code position a code
    return layout


def splice_condition_tokens(
    prompt_ids: Sequence[int], condition_tokens: Sequence[int], vocab: TokenVocab
) -> list[int]:
    """``prompt_ids`` with its one ``<image>`` id replaced by a condition image's ``condition_tokens``.

    Raises ``ValueError`` when the prompt has no placeholder or several, and :class:`LayoutError` (a
    ``ValueError``) when the tokens are not one well-formed image.
    """
    ids = [int(i) for i in prompt_ids]
    spots = [k for k, i in enumerate(ids) if i == vocab.image_placeholder]
    if len(spots) != 1:
        raise ValueError(f"the prompt has {len(spots)} condition-image placeholders, expected 1")
    check_condition_tokens(condition_tokens, vocab)
    k = spots[0]
    return [*ids[:k], *(int(t) for t in condition_tokens), *ids[k + 1 :]]


__all__ = ["check_condition_tokens", "encode_image_tokens", "splice_condition_tokens"]

"""Condition images at request time: image bytes (or images) -> FlexAR tokens for the prompt.

bytes -> the style reference's decoding and limits (format, pixel count, sides and aspect ratio on the
header; shrunk to the working side) -> optionally a depth estimator (the upload is a photo whose depth
map is the condition) -> :func:`~stylear_core.data.condition_tokens.encode_image_tokens` at the size
of the image to generate (centre crop, VQGAN, Lumina-mGPT layout). The tokens go where the prompt's
``<image>`` placeholder stands (:func:`~stylear_core.data.condition_tokens.splice_condition_tokens`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torch import nn

from stylear_core.data.condition_tokens import encode_image_tokens
from stylear_core.data.images import ImageDecodeError
from stylear_core.data.layout import ImageTokenLayout, LayoutError, TokenVocab
from stylear_core.inference.engine import GenerationRequestError
from stylear_core.models.depth import DepthEstimator


class ConditionImageError(ImageDecodeError):
    """Condition image bytes that do not decode or break a limit; the request field is ``condition``."""

    field = "condition"


class ConditionEncoder:
    """Condition images -> their token ids at a requested size.

    Takes the VQGAN, the model's vocab, ``load`` (bytes -> RGB image under the request limits; raises
    :class:`ImageDecodeError`) and an optional :class:`DepthEstimator` for ``depth=True``.
    """

    def __init__(
        self,
        vq: nn.Module,
        vocab: TokenVocab,
        load: Callable[[bytes], Image.Image],
        depth_estimator: DepthEstimator | None = None,
    ) -> None:
        self.vq = vq
        self.vocab = vocab
        self.load = load
        self.depth_estimator = depth_estimator

    def depth_maps(self, images: Sequence[Image.Image]) -> list[Image.Image]:
        """The depth maps of ``images`` (``RuntimeError`` without a depth estimator)."""
        if self.depth_estimator is None:
            raise RuntimeError("no depth estimator was configured")
        return self.depth_estimator(images)

    def tokens(
        self, images: Sequence[Image.Image], height: int, width: int, depth: bool = False
    ) -> torch.Tensor:
        """Token ids ``(B, num_tokens)`` of each image (its depth map with ``depth``) at ``height x width``
        (:class:`GenerationRequestError` on ``height`` / ``width`` for a size the vocabulary cannot lay out)."""
        try:
            layout = ImageTokenLayout.for_resolution(height, width, self.vocab)
        except LayoutError as e:  # named as the engine names it, before any work on the image
            field = "height" if "height" in str(e) or "h_latent" in str(e) else "width"
            raise GenerationRequestError(field, str(e)) from None
        images = self.depth_maps(images) if depth else list(images)
        return encode_image_tokens(self.vq, images, layout)

    def __call__(self, data: bytes, height: int, width: int, depth: bool = False) -> list[int]:
        """One condition image's bytes -> its token ids; :class:`ConditionImageError` if it does not decode."""
        try:
            image = self.load(data)
        except ImageDecodeError as e:
            raise ConditionImageError(str(e)) from None
        return self.tokens([image], height, width, depth)[0].tolist()


__all__ = ["ConditionEncoder", "ConditionImageError"]

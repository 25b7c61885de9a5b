"""StyleAR's style path at request time: reference image bytes -> style tokens for the engine.

bytes -> :func:`decode_image` (size-checked) -> optional SAM cleaning (the curation stage's
:class:`StyleRegionMasker`, which removes the reference's salient object so its content does not
leak) -> frozen CLIP penultimate features -> the (adapter's) perceiver resampler -> ``N`` style tokens
-> Gaussian "style-enhancing" noise of the requested strength, drawn from a per-request seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import nn

from stylear_core.data.images import decode_image
from stylear_core.models.clip import StyleEncoder
from stylear_core.models.style_tokens import add_style_noise

# Style noise draws from its own stream, so it does not share random numbers with token sampling.
STYLE_NOISE_SEED_OFFSET = 0x5EED_57A1


class StyleRequestError(ValueError):
    """A style reference that cannot be used; ``field`` names the request field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class ReferenceStyleEncoder:
    """Turns uploaded style references into style tokens ``(N, hidden)``.

    Takes the frozen :class:`StyleEncoder`, the base resampler (an adapter may bring its own, passed
    per call), an optional SAM masker (anything with ``clean_reference(pil) -> (mask, fraction,
    pil)``) and the largest reference accepted in pixels.
    """

    def __init__(
        self,
        style_encoder: StyleEncoder,
        resampler: nn.Module,
        masker: object | None = None,
        max_pixels: int = 4096 * 4096,
    ) -> None:
        self.style_encoder = style_encoder
        self.resampler = resampler
        self.masker = masker
        self.max_pixels = max_pixels

    def load(self, data: bytes) -> Image.Image:
        """Reference bytes -> RGB image; :class:`ImageDecodeError` if unreadable, empty or too large."""
        return decode_image(data, max_pixels=self.max_pixels)

    def clean(self, image: Image.Image) -> Image.Image:
        """The reference with its salient content removed by SAM."""
        if self.masker is None:
            raise StyleRequestError("sam", "SAM cleaning is not enabled on this server")
        return self.masker.clean_reference(image)[2]

    @torch.inference_mode()
    def style_tokens(
        self,
        images: Sequence[Image.Image],
        noise_strengths: Sequence[float],
        seeds: Sequence[int],
        resampler: nn.Module | None = None,
    ) -> torch.Tensor:
        """Style tokens ``(B, N, hidden)`` for prepared references, each with its own noise strength and seed."""
        resampler = resampler or self.resampler
        features = self.style_encoder.encode(list(images))
        param = next(resampler.parameters())
        tokens = resampler(features.to(device=param.device, dtype=param.dtype))
        rows = []
        for row, strength, seed in zip(tokens, noise_strengths, seeds):
            gen = torch.Generator(device=row.device)
            gen.manual_seed((int(seed) + STYLE_NOISE_SEED_OFFSET) % 2**63)
            rows.append(add_style_noise(row.unsqueeze(0), float(strength), gen))
        return torch.cat(rows)

    def __call__(
        self,
        data: bytes,
        use_sam: bool,
        noise_strength: float,
        seed: int,
        resampler: nn.Module | None = None,
    ) -> torch.Tensor:
        """One reference's bytes -> style tokens ``(N, hidden)`` (decode, optional SAM, CLIP, resampler, noise)."""
        image = self.load(data)
        if use_sam:
            image = self.clean(image)
        return self.style_tokens([image], [noise_strength], [seed], resampler)[0]

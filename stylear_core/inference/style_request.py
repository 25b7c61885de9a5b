"""StyleAR's style path at request time: reference image bytes -> style tokens for the engine.

bytes -> :func:`decode_image` (format, pixel count, sides and aspect ratio checked on the header,
then shrunk to the working side) -> optional SAM cleaning (the curation stage's
:class:`StyleRegionMasker`, which removes the reference's salient object so its content does not
leak) -> frozen CLIP penultimate features -> the (adapter's) perceiver resampler -> ``N`` style tokens
-> Gaussian "style-enhancing" noise of the requested strength, drawn from a per-request seed.

Shrinking right after decoding bounds everything after it (SAM's masks, the halo dilation, the fill,
CLIP's preprocessing) by the working side, whatever the upload's size: neither SAM (which resizes its
input to its encoder's side, 1024 for the released models) nor CLIP (which resizes the shorter side
to 224 for ViT-H/14 and centre-crops) looks at more pixels than that.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import nn

from stylear_core.data.images import WEB_FORMATS, decode_image
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
    pil)``), the limits a reference must meet (largest pixel count, longer side and aspect ratio, the
    accepted formats) and the working side references are shrunk to before anything else runs.
    """

    def __init__(
        self,
        style_encoder: StyleEncoder,
        resampler: nn.Module,
        masker: object | None = None,
        max_pixels: int = 4096 * 4096,
        *,
        max_side: int | None = 8192,
        max_aspect: float | None = 4.0,
        formats: Sequence[str] | None = WEB_FORMATS,
        working_side: int | None = 1024,
    ) -> None:
        self.style_encoder = style_encoder
        self.resampler = resampler
        self.masker = masker
        self.max_pixels = max_pixels
        self.max_side = max_side
        self.max_aspect = max_aspect
        self.formats = formats
        self.working_side = working_side

    def load(self, data: bytes) -> Image.Image:
        """Reference bytes -> RGB image no larger than the working side.

        Raises :class:`ImageDecodeError` (or its subclasses) if the bytes are unreadable, empty, of an
        unaccepted format or over a limit.
        """
        return decode_image(
            data,
            self.max_pixels,
            max_side=self.max_side,
            max_aspect=self.max_aspect,
            formats=self.formats,
            working_side=self.working_side,
        )

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

"""StyleAR's style path at request time: reference image bytes -> style tokens for the engine.

bytes -> :func:`decode_image` (format, pixel count, sides and aspect ratio checked on the header,
then shrunk to the working side) -> optional SAM -> frozen CLIP penultimate features -> the
(adapter's) perceiver resampler -> ``N`` style tokens -> Gaussian "style-enhancing" noise of the
requested strength, drawn from a per-request seed.

SAM keeps the reference's salient object from leaking its content into the style, in one of two modes:

- ``mask``: the curation stage's :class:`StyleRegionMasker` removes the object from the reference
  image (filled from the surrounding pixels) before it is encoded;
- ``subtract``: StyleAR's released inference. The reference ``e0`` and the content SAM cut out of it
  ``e1`` (the object on a neutral background) are encoded in one CLIP batch, and the tokens are
  ``(1 - mix) * R(e0) + mix * R(e0 - subtract * e1)`` (:func:`subtract_content_style_tokens`,
  0.8 / 0.8 as released), before the same noise as in ``mask`` mode.

Shrinking right after decoding bounds everything after it (SAM's masks, the halo dilation, the fill,
CLIP's preprocessing) by the working side, whatever the upload's size: neither SAM (which resizes its
input to its encoder's side, 1024 for the released models) nor CLIP (which resizes the shorter side
to 224 for ViT-H/14 and centre-crops) looks at more pixels than that.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image
from torch import nn

from stylear_core.data.images import WEB_FORMATS, decode_image
from stylear_core.models.clip import ClipVisionTower
from stylear_core.models.style_tokens import (
    add_style_noise,
    resample_style_tokens,
    subtract_content_style_tokens,
)

# Style noise draws from its own stream, so it does not share random numbers with token sampling.
STYLE_NOISE_SEED_OFFSET = 0x5EED_57A1

SamMode = Literal["mask", "subtract"]
SAM_MODES: tuple[str, ...] = ("mask", "subtract")


class StyleRequestError(ValueError):
    """A style reference that cannot be used; ``field`` names the request field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class PreparedReference:
    """A reference ready for CLIP: ``image`` as encoded (SAM-cleaned in ``mask`` mode) and, in ``subtract``
    mode, the ``content`` SAM cut out of it (``None`` otherwise)."""

    image: Image.Image
    content: Image.Image | None = None


class ReferenceStyleEncoder:
    """Turns uploaded style references into style tokens ``(N, hidden)``.

    Takes the frozen :class:`ClipVisionTower`, the base resampler (an adapter may bring its own, passed
    per call), an optional SAM masker (anything with ``clean_reference(pil) -> (mask, fraction,
    pil)`` for ``mask`` mode and ``content_reference(pil) -> pil`` for ``subtract`` mode), the limits a
    reference must meet (largest pixel count, longer side and aspect ratio, the accepted formats), the
    working side references are shrunk to before anything else runs, and the ``subtract`` mode's
    weights (``subtract_weight`` scales the content features taken from the reference's, ``mix_weight``
    is the share of the content-free tokens in the mix).
    """

    def __init__(
        self,
        style_encoder: ClipVisionTower,
        resampler: nn.Module,
        masker: object | None = None,
        max_pixels: int = 4096 * 4096,
        *,
        max_side: int | None = 8192,
        max_aspect: float | None = 4.0,
        formats: Sequence[str] | None = WEB_FORMATS,
        working_side: int | None = 1024,
        subtract_weight: float = 0.8,
        mix_weight: float = 0.8,
    ) -> None:
        self.style_encoder = style_encoder
        self.resampler = resampler
        self.masker = masker
        self.max_pixels = max_pixels
        self.max_side = max_side
        self.max_aspect = max_aspect
        self.formats = formats
        self.working_side = working_side
        self.subtract_weight = subtract_weight
        self.mix_weight = mix_weight

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

    def content(self, image: Image.Image) -> Image.Image:
        """The reference's salient content as SAM cuts it out (object pixels on a neutral background)."""
        if self.masker is None:
            raise StyleRequestError("sam", "SAM is not enabled on this server")
        return self.masker.content_reference(image)

    @staticmethod
    def _add_noise(
        tokens: torch.Tensor, noise_strengths: Sequence[float], seeds: Sequence[int]
    ) -> torch.Tensor:
        """Each row's noise from its own stream (the request's seed, offset): the same in every SAM mode."""
        rows = []
        for row, strength, seed in zip(tokens, noise_strengths, seeds):
            gen = torch.Generator(device=row.device)
            gen.manual_seed((int(seed) + STYLE_NOISE_SEED_OFFSET) % 2**63)
            rows.append(add_style_noise(row.unsqueeze(0), float(strength), gen))
        return torch.cat(rows)

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
        tokens = resample_style_tokens(resampler, features)
        return self._add_noise(tokens, noise_strengths, seeds)

    @torch.inference_mode()
    def subtracted_style_tokens(
        self,
        images: Sequence[Image.Image],
        contents: Sequence[Image.Image],
        noise_strengths: Sequence[float],
        seeds: Sequence[int],
        resampler: nn.Module | None = None,
        subtract_weight: float | None = None,
        mix_weight: float | None = None,
    ) -> torch.Tensor:
        """Style tokens ``(B, N, hidden)`` with each reference's content subtracted in CLIP-feature space.

        References and their content cut-outs go through CLIP as one batch; then
        :func:`subtract_content_style_tokens` with the given weights (None: this encoder's), then the
        noise as in :meth:`style_tokens`.
        """
        if len(images) != len(contents):
            raise ValueError(f"{len(images)} references but {len(contents)} content images")
        resampler = resampler or self.resampler
        features = self.style_encoder.encode([*images, *contents])
        param = next(resampler.parameters())
        features = features.to(device=param.device, dtype=param.dtype)
        tokens = subtract_content_style_tokens(
            resampler,
            features[: len(images)],
            features[len(images) :],
            subtract=self.subtract_weight if subtract_weight is None else subtract_weight,
            mix=self.mix_weight if mix_weight is None else mix_weight,
        )
        return self._add_noise(tokens, noise_strengths, seeds)

    def prepare(self, data: bytes, use_sam: bool, sam_mode: SamMode = "mask") -> PreparedReference:
        """Reference bytes -> what :meth:`encode` takes: decoded, checked, shrunk, and SAM's part done.

        Raises :class:`StyleRequestError` for an unknown ``sam_mode`` or SAM asked of a server without it,
        and :class:`ImageDecodeError` for bytes :meth:`load` refuses.
        """
        if sam_mode not in SAM_MODES:
            raise StyleRequestError(
                "sam_mode", f"unknown SAM mode {sam_mode!r} (known: {', '.join(SAM_MODES)})"
            )
        image = self.load(data)
        if use_sam and sam_mode == "subtract":
            return PreparedReference(image, self.content(image))
        return PreparedReference(self.clean(image) if use_sam else image)

    def encode(
        self,
        references: Sequence[PreparedReference],
        noise_strengths: Sequence[float],
        seeds: Sequence[int],
        resampler: nn.Module | None = None,
        subtract_weight: float | None = None,
        mix_weight: float | None = None,
    ) -> torch.Tensor:
        """Style tokens ``(B, N, hidden)`` of prepared references, in order, batched through CLIP.

        References of both kinds may be mixed: the plain ones go through :meth:`style_tokens` as one
        batch and the ``subtract`` ones through :meth:`subtracted_style_tokens` as another. Each row's
        noise comes from its own seed, so a reference gets the same tokens in any batch.
        """
        groups: dict[bool, list[int]] = {False: [], True: []}
        for i, ref in enumerate(references):
            groups[ref.content is not None].append(i)
        parts: list[tuple[list[int], torch.Tensor]] = []
        for subtract, index in groups.items():
            if not index:
                continue
            strengths, row_seeds = [noise_strengths[i] for i in index], [seeds[i] for i in index]
            images = [references[i].image for i in index]
            if subtract:
                contents = [references[i].content for i in index]
                tokens = self.subtracted_style_tokens(
                    images, contents, strengths, row_seeds, resampler, subtract_weight, mix_weight
                )
            else:
                tokens = self.style_tokens(images, strengths, row_seeds, resampler)
            parts.append((index, tokens))
        if len(parts) == 1:
            return parts[0][1]
        out = parts[0][1].new_empty((len(references), *parts[0][1].shape[1:]))
        for index, tokens in parts:
            out[index] = tokens
        return out

    def __call__(
        self,
        data: bytes,
        use_sam: bool,
        noise_strength: float,
        seed: int,
        resampler: nn.Module | None = None,
        sam_mode: SamMode = "mask",
        subtract_weight: float | None = None,
        mix_weight: float | None = None,
    ) -> torch.Tensor:
        """One reference's bytes -> style tokens ``(N, hidden)`` (decode, optional SAM, CLIP, resampler, noise).

        ``sam_mode`` (used when ``use_sam``): ``mask`` encodes the reference with its content removed,
        ``subtract`` subtracts the content's CLIP features as StyleAR's release does (module docstring),
        with ``subtract_weight`` / ``mix_weight`` (None: this encoder's). :meth:`prepare` then
        :meth:`encode` of one.
        """
        prepared = self.prepare(data, use_sam, sam_mode)
        return self.encode([prepared], [noise_strength], [seed], resampler, subtract_weight, mix_weight)[0]

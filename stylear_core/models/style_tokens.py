"""Placing StyleAR's style tokens into a prompt's embedding sequence, and style-enhancing noise.

The prompt holds ``N`` placeholder ids (``TokenVocab.style_placeholder``); the resampler gives ``N``
style tokens per image. :func:`inject_style_tokens` swaps the placeholders' embeddings for the
style tokens, in order. :func:`add_style_noise` is StyleAR's "style-enhanced tokens": Gaussian noise
``tokens + randn * strength`` so the backbone takes style, not content, from them. :func:`subtract_content_style_tokens` is the release's SAM
content subtraction at inference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class StylePlaceholderError(ValueError):
    """A prompt row has a different number of style placeholders than there are style tokens."""


def style_placeholder_mask(
    input_ids: torch.Tensor, placeholder_id: int, num_style_tokens: int
) -> torch.Tensor:
    """Boolean ``(B, L)`` mask of the placeholder positions; raises naming the first row whose count is wrong."""
    mask = input_ids == placeholder_id
    counts = mask.sum(dim=1)
    bad = (counts != num_style_tokens).nonzero()
    if len(bad):
        row = int(bad[0, 0])
        raise StylePlaceholderError(
            f"row {row} has {int(counts[row])} style-placeholder ids ({placeholder_id}), "
            f"expected {num_style_tokens} (one per style token)"
        )
    return mask


def inject_style_tokens(
    inputs_embeds: torch.Tensor, input_ids: torch.Tensor, style_tokens: torch.Tensor, placeholder_id: int
) -> torch.Tensor:
    """Embeddings ``(B, L, D)`` with the placeholder positions of ``input_ids (B, L)`` replaced.

    Row ``b``'s ``i``-th placeholder gets ``style_tokens[b, i]`` (``style_tokens``: ``(B, N, D)``).
    Returns a new tensor (gradients flow to ``style_tokens``); raises :class:`StylePlaceholderError`
    naming the row if a row does not hold exactly ``N`` placeholders.
    """
    if style_tokens.ndim != 3 or style_tokens.shape[0] != inputs_embeds.shape[0]:
        raise ValueError(
            f"style_tokens {tuple(style_tokens.shape)} do not match embeddings {tuple(inputs_embeds.shape)}"
        )
    if style_tokens.shape[-1] != inputs_embeds.shape[-1]:
        raise ValueError(
            f"style tokens have width {style_tokens.shape[-1]}, embeddings {inputs_embeds.shape[-1]}"
        )
    mask = style_placeholder_mask(input_ids, placeholder_id, style_tokens.shape[1]).to(inputs_embeds.device)
    # masked_scatter fills the True positions in row-major order: row b's placeholders take row b's tokens.
    return inputs_embeds.masked_scatter(mask.unsqueeze(-1), style_tokens.to(inputs_embeds.dtype))


def resample_style_tokens(resampler: torch.nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Frozen CLIP features ``(B, tokens, width)`` -> style tokens ``(B, N, hidden)`` (before noise), the
    features moved to the resampler's device and dtype: the one image-to-style-tokens step that training
    (:class:`~stylear_core.models.stylear.StyleARModel`) and serving references share."""
    param = next(resampler.parameters())
    return resampler(features.to(device=param.device, dtype=param.dtype))


def add_style_noise(
    tokens: torch.Tensor, strength: float | torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``tokens + randn_like(tokens) * strength``; ``strength`` is a float or a per-row ``(B,)`` tensor.

    A strength of exactly 0 returns ``tokens`` unchanged (and draws no random numbers).
    """
    if isinstance(strength, torch.Tensor):
        strength = strength.to(device=tokens.device, dtype=tokens.dtype)
        if strength.ndim == 1:
            strength = strength.view(-1, *([1] * (tokens.ndim - 1)))
        if not bool((strength != 0).any()):
            return tokens
    elif strength == 0:
        return tokens
    noise = torch.randn(tokens.shape, generator=generator, device=tokens.device, dtype=tokens.dtype)
    return tokens + noise * strength


def subtract_content_style_tokens(
    resampler: Callable[[torch.Tensor], torch.Tensor],
    features: torch.Tensor,
    content_features: torch.Tensor,
    subtract: float = 0.8,
    mix: float = 0.8,
) -> torch.Tensor:
    """Style tokens with the reference's salient content subtracted in CLIP-feature space.

    StyleAR's released inference (wuyi2020/StyleAR ``FlexARInferenceSolver.generate``) encodes the
    reference ``e0`` and the content SAM cut out of it ``e1`` (penultimate CLIP features), then::

        e1 <- e0 - subtract * e1
        tokens = (1 - mix) * R(e0) + mix * R(e1)

    with ``subtract = mix = 0.8`` as released. ``features`` and ``content_features`` are
    ``(B, T, width)``; both branches go through ``resampler`` as one batch, as in the release. Returns
    ``(B, N, hidden)`` without noise: add :func:`add_style_noise` afterwards, as the release does.
    """
    if features.shape != content_features.shape or features.ndim != 3:
        raise ValueError(
            f"features {tuple(features.shape)} and content_features {tuple(content_features.shape)} "
            "must both be (B, tokens, width)"
        )
    batch = features.shape[0]
    content_free = features - subtract * content_features.to(features.dtype)
    tokens = resampler(torch.cat([features, content_free], dim=0))
    return (1.0 - mix) * tokens[:batch] + mix * tokens[batch:]

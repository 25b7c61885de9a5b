"""StyleAR's perceiver resampler: CLIP penultimate features -> style tokens in the backbone's embedding space.

This is the IP-Adapter-Plus ``Resampler`` (tencent-ailab/IP-Adapter ``ip_adapter/resampler.py``, itself
from open_flamingo's perceiver resampler) with the module names, parameter layout and forward math of
that file, so StyleAR's released ``image_proj.pth`` (the resampler's own, unprefixed state dict) loads
as is. StyleAR's sizes: ``dim 4096, depth 4, dim_head 64, heads 12, num_queries 16, embedding_dim 1280,
output_dim 4096, ff_mult 4`` -- 16 style tokens of width 4096 from 257 x 1280 ViT-H/14 features.

Layout (``i`` = layer)::

    latents                       (1, num_queries, dim)
    proj_in.{weight,bias}         embedding_dim -> dim
    layers.i.0.{norm1,norm2}.*    LayerNorm(dim)               (PerceiverAttention)
    layers.i.0.to_q.weight        dim -> heads*dim_head        (no bias)
    layers.i.0.to_kv.weight       dim -> 2*heads*dim_head      (no bias)
    layers.i.0.to_out.weight      heads*dim_head -> dim        (no bias)
    layers.i.1.0.*                LayerNorm(dim)               (feed-forward)
    layers.i.1.1.weight           dim -> ff_mult*dim           (no bias)
    layers.i.1.3.weight           ff_mult*dim -> dim           (no bias)
    proj_out.{weight,bias}        dim -> output_dim
    norm_out.{weight,bias}        LayerNorm(output_dim)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn


class ImageProjLoadError(ValueError):
    """A state dict does not fit a :class:`StyleResampler`; the message names the offending keys."""


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, L, heads * d)`` -> ``(B, heads, L, d)`` (IP-Adapter's ``reshape_tensor``)."""
    batch, length, _ = x.shape
    return x.view(batch, length, heads, -1).transpose(1, 2)


class PerceiverAttention(nn.Module):
    """Latents attend to ``concat(features, latents)``; takes features ``(B, N, dim)`` and latents
    ``(B, Q, dim)``, gives the attention output ``(B, Q, dim)`` (the caller adds the residual)."""

    def __init__(self, *, dim: int, dim_head: int = 64, heads: int = 8):
        super().__init__()
        self.dim_head = dim_head
        self.heads = heads
        inner_dim = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, inner_dim * 2, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Features ``(B, N, dim)``, latents ``(B, Q, dim)`` -> ``(B, Q, dim)``."""
        x = self.norm1(x)
        latents = self.norm2(latents)
        batch, num_latents, _ = latents.shape

        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
        q, k, v = (split_heads(t, self.heads) for t in (q, k, v))

        # The reference splits the 1/sqrt(d) scale over q and k and softmaxes in fp32: it keeps
        # fp16/bf16 logits in range, and matching it keeps released weights giving released outputs.
        scale = 1 / math.sqrt(math.sqrt(self.dim_head))
        weight = (q * scale) @ (k * scale).transpose(-2, -1)
        weight = torch.softmax(weight.float(), dim=-1).to(weight.dtype)
        out = (weight @ v).permute(0, 2, 1, 3).reshape(batch, num_latents, -1)
        return self.to_out(out)


class PerceiverFeedForward(nn.Sequential):
    """LayerNorm -> Linear(dim, mult*dim, no bias) -> GELU -> Linear(mult*dim, dim, no bias); ``(..., dim)``
    -> ``(..., dim)``. A Sequential so its parameters are named ``0.*``, ``1.*``, ``3.*`` as released."""

    def __init__(self, dim: int, mult: int = 4):
        inner_dim = int(dim * mult)
        super().__init__(
            nn.LayerNorm(dim),
            nn.Linear(dim, inner_dim, bias=False),
            nn.GELU(),
            nn.Linear(inner_dim, dim, bias=False),
        )


class StyleResampler(nn.Module):
    """Perceiver resampler: image features ``(B, N, embedding_dim)`` -> style tokens
    ``(B, num_queries, output_dim)``.

    Defaults are StyleAR's released sizes (:func:`stylear_resampler_7b`). The ``num_queries`` learned
    latents (initialised ``randn / sqrt(dim)``) cross-attend ``depth`` times to the projected features,
    each attention and feed-forward with a residual; the result is projected and layer-normed.
    """

    def __init__(
        self,
        dim: int = 4096,
        depth: int = 4,
        dim_head: int = 64,
        heads: int = 12,
        num_queries: int = 16,
        embedding_dim: int = 1280,
        output_dim: int = 4096,
        ff_mult: int = 4,
    ):
        super().__init__()
        self.num_queries = num_queries
        self.embedding_dim = embedding_dim
        self.output_dim = output_dim
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads),
                    PerceiverFeedForward(dim, ff_mult),
                ]
            )
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image features ``(B, N, embedding_dim)`` -> style tokens ``(B, num_queries, output_dim)``."""
        latents = self.latents.repeat(x.size(0), 1, 1)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


def stylear_resampler_7b() -> StyleResampler:
    """StyleAR's resampler for Lumina-mGPT-7B: ViT-H/14 features (1280) -> 16 tokens of width 4096
    (~610M parameters; build it under ``torch.device("meta")`` to inspect it without allocating)."""
    return StyleResampler(
        dim=4096,
        depth=4,
        dim_head=64,
        heads=12,
        num_queries=16,
        embedding_dim=1280,
        output_dim=4096,
        ff_mult=4,
    )


def tiny_resampler(embedding_dim: int, output_dim: int, num_queries: int = 4) -> StyleResampler:
    """A small resampler of the same architecture for tests and the CPU demo (dim 64, 2 layers, 4 heads)."""
    return StyleResampler(
        dim=64,
        depth=2,
        dim_head=16,
        heads=4,
        num_queries=num_queries,
        embedding_dim=embedding_dim,
        output_dim=output_dim,
        ff_mult=2,
    )


def _read_state_dict(source: str | Path | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    if isinstance(source, Mapping):
        return source
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"image_proj checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def load_image_proj(
    source: str | Path | Mapping[str, torch.Tensor], resampler: StyleResampler
) -> StyleResampler:
    """Load a resampler state dict (a path to ``image_proj.pth`` / ``.safetensors``, or the dict) into
    ``resampler`` strictly, casting to the resampler's dtype; returns ``resampler``.

    Raises :class:`ImageProjLoadError` naming every missing, unexpected or mis-shaped key. A resampler
    on the meta device takes the loaded tensors as its parameters.
    """
    state_dict = _read_state_dict(source)
    expected = resampler.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mis_shaped = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    if mis_shaped:
        problems.append(f"mis-shaped keys: {'; '.join(mis_shaped)}")
    if problems:
        raise ImageProjLoadError("image_proj state dict does not fit the resampler: " + " | ".join(problems))

    on_meta = any(p.is_meta for p in resampler.parameters())
    state_dict = {k: state_dict[k].to(dtype=v.dtype) for k, v in expected.items()}
    resampler.load_state_dict(state_dict, strict=True, assign=on_meta)
    return resampler

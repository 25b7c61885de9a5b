"""Chameleon's VQGAN image tokenizer (Meta's ``vqgan.ckpt`` + ``vqgan.yaml``): pixels <-> VQ codes.

The released checkpoint is a taming-transformers ``VQModel``: a conv encoder with five levels
(downsample 16), a 1x1 ``quant_conv`` into the codebook space, a nearest-neighbour codebook
lookup (8192 x 256, plain squared L2 distance, no normalisation), a 1x1 ``post_quant_conv`` and
the mirror-image decoder. :class:`ChameleonVQGAN` keeps the taming module names, so its
``state_dict`` *is* the checkpoint layout and
:func:`~stylear_core.models.vqgan_checkpoint.load_chameleon_vqgan` needs no key converter. Reading
``vqgan.yaml`` / ``vqgan.ckpt`` and the checkpoint conversion live in
:mod:`stylear_core.models.vqgan_checkpoint`; this module is the model.

The encoder and the residual / attention blocks come from transformers' Chameleon port (its
``ChameleonVQVAE`` is a verbatim taming encoder with the same key names); transformers has no
decoder, so :class:`VQGANDecoder` assembles the taming decoder from the same blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import ChameleonVQVAEConfig
from transformers.models.chameleon.modeling_chameleon import (
    ChameleonVQVAEEncoder,
    ChameleonVQVAEEncoderAttnBlock,
    ChameleonVQVAEEncoderResnetBlock,
)

from stylear_core.config import ConfigError, option
from stylear_core.data.images import center_crop_resize, to_pil, to_tensor

# Every GroupNorm in the taming blocks uses 32 groups.
_NORM_GROUPS = 32


@dataclass
class VQGANConfig:
    """Sizes of a taming VQGAN (the ``ddconfig`` of ``vqgan.yaml`` plus ``n_embed`` / ``embed_dim``).

    Defaults are Chameleon's released tokenizer.
    """

    ch: int = option(128, "base channel count of the encoder/decoder")
    ch_mult: list[int] = option(
        [1, 1, 2, 2, 4], "channel multiplier per level; len - 1 = number of 2x downsamples"
    )
    num_res_blocks: int = option(2, "residual blocks per encoder level (the decoder has one more)")
    z_channels: int = option(256, "channels of the encoder output / decoder input")
    embed_dim: int = option(256, "codebook vector size (quant_conv output channels)")
    n_embed: int = option(8192, "codebook size (number of VQ codes)")
    in_channels: int = option(3, "image channels in")
    out_ch: int = option(3, "image channels out")
    resolution: int = option(512, "training resolution; only decides which levels get attention")
    attn_resolutions: list[int] = option([], "feature-map sizes (at `resolution`) that get self-attention")
    dropout: float = option(0.0, "dropout inside the residual blocks")

    @property
    def downsample(self) -> int:
        """Pixels per latent cell along each side."""
        return 2 ** (len(self.ch_mult) - 1)

    def validate(self) -> None:
        """Raise :class:`ConfigError` (a ``ValueError``) naming the first field that cannot build a model."""
        if not self.ch_mult:
            raise ConfigError("ch_mult: needs at least one level")
        for name in ("ch", "num_res_blocks", "z_channels", "embed_dim", "n_embed", "in_channels", "out_ch"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        for i, mult in enumerate(self.ch_mult):
            channels = self.ch * mult
            if mult <= 0 or channels % _NORM_GROUPS:
                raise ConfigError(
                    f"ch_mult[{i}]: ch * ch_mult = {channels} channels, GroupNorm needs a positive "
                    f"multiple of {_NORM_GROUPS}"
                )
        if self.ch % _NORM_GROUPS:
            raise ConfigError(f"ch: {self.ch} is not a multiple of {_NORM_GROUPS} (GroupNorm groups)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout}")


def chameleon_vqgan_config() -> VQGANConfig:
    """Chameleon's tokenizer: codebook 8192 x 256, ``ch 128, ch_mult [1,1,2,2,4]``, 2 res blocks, no level attention."""
    return VQGANConfig()


def tiny_vqgan_config() -> VQGANConfig:
    """A CPU-sized VQGAN with the real topology (five levels, downsample 16, mid attention)."""
    return VQGANConfig(
        ch=32,
        ch_mult=[1, 1, 2, 2, 4],
        num_res_blocks=1,
        z_channels=32,
        embed_dim=32,
        n_embed=256,
        resolution=64,
        attn_resolutions=[],
    )


def mini_vqgan_config() -> VQGANConfig:
    """The miniature world's VQGAN: 64 px, four levels (downsample 8 -> 8x8 codes), 512 codes of size 16."""
    return VQGANConfig(
        ch=32,
        ch_mult=[1, 1, 2, 4],
        num_res_blocks=1,
        z_channels=32,
        embed_dim=16,
        n_embed=512,
        resolution=64,
        attn_resolutions=[],
    )


def _transformers_config(config: VQGANConfig) -> ChameleonVQVAEConfig:
    """The same sizes in transformers' naming, for its Chameleon encoder and blocks."""
    return ChameleonVQVAEConfig(
        embed_dim=config.embed_dim,
        num_embeddings=config.n_embed,
        double_latent=False,
        latent_channels=config.z_channels,
        resolution=config.resolution,
        in_channels=config.in_channels,
        base_channels=config.ch,
        channel_multiplier=list(config.ch_mult),
        num_res_blocks=config.num_res_blocks,
        attn_resolutions=list(config.attn_resolutions),
        dropout=config.dropout,
        attn_type="vanilla",
    )


def _swish(x: torch.Tensor) -> torch.Tensor:
    # Written as taming writes it (not F.silu) so outputs match the reference op for op.
    return x * torch.sigmoid(x)


class VQGANUpsample(nn.Module):
    """taming's ``Upsample(with_conv=True)``: nearest 2x, then a 3x3 conv (key ``upsample.conv``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, C, 2H, 2W)``."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class VQGANDecoder(nn.Module):
    """taming's ``Decoder`` (``temb_ch 0``, vanilla attention): latents ``(B, z, h, w)`` -> pixels ``(B, out_ch, 16h, 16w)``.

    Module names follow taming (``conv_in``, ``mid.block_1/attn_1/block_2``, ``up.{level}.block.{i}``,
    ``up.{level}.attn.{i}``, ``up.{level}.upsample.conv``, ``norm_out``, ``conv_out``); ``up`` is indexed
    by level, so ``up[0]`` runs last at full resolution.
    """

    def __init__(self, config: VQGANConfig, block_config: ChameleonVQVAEConfig | None = None) -> None:
        super().__init__()
        block_config = block_config if block_config is not None else _transformers_config(config)
        num_levels = len(config.ch_mult)
        self.num_res_blocks = config.num_res_blocks
        block_in = config.ch * config.ch_mult[-1]
        curr_res = config.resolution // 2 ** (num_levels - 1)

        self.conv_in = nn.Conv2d(config.z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ChameleonVQVAEEncoderResnetBlock(block_config, block_in, block_in)
        self.mid.attn_1 = ChameleonVQVAEEncoderAttnBlock(block_in)
        self.mid.block_2 = ChameleonVQVAEEncoderResnetBlock(block_config, block_in, block_in)

        levels: list[nn.Module] = []
        for level in reversed(range(num_levels)):
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            block_out = config.ch * config.ch_mult[level]
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ChameleonVQVAEEncoderResnetBlock(block_config, block_in, block_out))
                block_in = block_out
                if curr_res in config.attn_resolutions:
                    attns.append(ChameleonVQVAEEncoderAttnBlock(block_in))
            up = nn.Module()
            up.block = blocks
            up.attn = attns
            if level != 0:
                up.upsample = VQGANUpsample(block_in)
                curr_res *= 2
            levels.insert(0, up)
        self.up = nn.ModuleList(levels)

        self.norm_out = nn.GroupNorm(_NORM_GROUPS, block_in, eps=1e-6, affine=True)
        self.conv_out = nn.Conv2d(block_in, config.out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Post-quant-conv latents ``(B, z_channels, h, w)`` -> raw decoder output ``(B, out_ch, H, W)``."""
        h = self.conv_in(z)
        h = self.mid.block_1(h)
        h = self.mid.attn_1(h)
        h = self.mid.block_2(h)
        for level in reversed(range(len(self.up))):
            up = self.up[level]
            for i in range(self.num_res_blocks + 1):
                h = up.block[i](h)
                if len(up.attn) > 0:
                    h = up.attn[i](h)
            if level != 0:
                h = up.upsample(h)
        h = _swish(self.norm_out(h))
        return self.conv_out(h)


class VQCodebook(nn.Module):
    """taming's ``VectorQuantizer2`` at inference (key ``quantize.embedding.weight``).

    The code of a latent vector is the codebook row at the smallest squared L2 distance, computed
    as ``|z|^2 + |e|^2 - 2 z.e`` exactly as taming does (no l2-normalisation, no remap). Distances
    are always float32: in bf16 near-equal distances over 8192 codes would tie or swap.
    """

    def __init__(self, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)
        # taming's initialisation: small codes, so random latents spread over many of them.
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)

    def nearest_codes(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, embed_dim, h, w)`` -> codes ``(B, h, w)`` (int64)."""
        b, c, h, w = latents.shape
        z = latents.permute(0, 2, 3, 1).reshape(-1, c).float()
        codebook = self.embedding.weight.float()
        distances = (
            torch.sum(z**2, dim=1, keepdim=True)
            + torch.sum(codebook**2, dim=1)
            - 2 * torch.einsum("bd,dn->bn", z, codebook.transpose(0, 1))
        )
        return torch.argmin(distances, dim=1).view(b, h, w)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``(B, h, w)`` -> codebook vectors ``(B, embed_dim, h, w)`` (taming's ``get_codebook_entry``)."""
        return self.embedding(codes).permute(0, 3, 1, 2).contiguous()


class ChameleonVQGAN(nn.Module):
    """Chameleon's VQGAN tokenizer: :meth:`encode` pixels to VQ codes, :meth:`decode` codes to pixels.

    Pixels are ``(B, in_channels, H, W)`` floats in [-1, 1] with ``H`` and ``W`` multiples of
    :attr:`downsample`; codes are ``(B, H / 16, W / 16)`` int64 in ``[0, codebook_size)``, row-major
    like Lumina-mGPT's token rows. The ``state_dict`` keys are the taming checkpoint's keys.
    Meant to be used frozen (``eval()``), but nothing stops gradients through
    :meth:`encode_latents` and :meth:`decode_latents`.
    """

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        block_config = _transformers_config(config)
        self.encoder = ChameleonVQVAEEncoder(block_config)
        self.decoder = VQGANDecoder(config, block_config)
        self.quantize = VQCodebook(config.n_embed, config.embed_dim)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    @property
    def downsample(self) -> int:
        """Pixels per code along each side (16 for Chameleon)."""
        return self.config.downsample

    @property
    def codebook_size(self) -> int:
        """Number of VQ codes (8192 for Chameleon)."""
        return self.config.n_embed

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        """Pixel size -> code grid ``(h, w)``; raises ``ValueError`` if a side is not a multiple of :attr:`downsample`."""
        if height <= 0 or width <= 0 or height % self.downsample or width % self.downsample:
            raise ValueError(f"image size {height}x{width} is not a positive multiple of {self.downsample}")
        return height // self.downsample, width // self.downsample

    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``(B, C, H, W)`` in [-1, 1] -> pre-quantisation latents ``(B, embed_dim, H/16, W/16)``."""
        if pixels.dim() != 4 or pixels.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected pixels of shape (B, {self.config.in_channels}, H, W), got {tuple(pixels.shape)}"
            )
        self.latent_size(pixels.shape[2], pixels.shape[3])
        weight = self.quant_conv.weight
        h = self.encoder(pixels.to(device=weight.device, dtype=weight.dtype))
        return self.quant_conv(h)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``(B, C, H, W)`` in [-1, 1] -> VQ codes ``(B, H/16, W/16)`` (int64)."""
        # Codes come out of an argmin, so there is nothing to differentiate: skip the autograd graph.
        return self.quantize.nearest_codes(self.encode_latents(pixels))

    def codes_to_latents(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``(B, h, w)`` -> codebook vectors ``(B, embed_dim, h, w)``; rejects out-of-range codes."""
        if codes.dim() != 3 or codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise ValueError(
                f"expected integer codes of shape (B, h, w), got {codes.dtype} {tuple(codes.shape)}"
            )
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(
                f"codes must be in [0, {self.codebook_size}), got [{int(codes.min())}, {int(codes.max())}]"
            )
        return self.quantize.lookup(codes.to(device=self.quant_conv.weight.device, dtype=torch.long))

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Codebook vectors ``(B, embed_dim, h, w)`` -> raw decoder output ``(B, out_ch, 16h, 16w)`` (not clamped)."""
        return self.decoder(self.post_quant_conv(latents.to(self.post_quant_conv.weight.dtype)))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """VQ codes ``(B, h, w)`` -> pixels ``(B, out_ch, 16h, 16w)`` clamped to [-1, 1]."""
        return self.decode_latents(self.codes_to_latents(codes)).clamp(-1.0, 1.0)


def random_vqgan(config: VQGANConfig, seed: int | None = None) -> ChameleonVQGAN:
    """A randomly initialised VQGAN of ``config`` in eval mode; ``seed`` fixes the weights without touching global RNG."""
    if seed is None:
        return ChameleonVQGAN(config).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ChameleonVQGAN(config).eval()


def chameleon_vqgan(seed: int | None = None) -> ChameleonVQGAN:
    """Chameleon's VQGAN architecture with random weights (:func:`~stylear_core.models.vqgan_checkpoint.load_chameleon_vqgan` loads the real ones)."""
    return random_vqgan(chameleon_vqgan_config(), seed)


def tiny_vqgan(seed: int = 0) -> ChameleonVQGAN:
    """The tiny CPU VQGAN of :func:`tiny_vqgan_config`, seeded random weights."""
    return random_vqgan(tiny_vqgan_config(), seed)


def _size_pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


@torch.no_grad()
def encode_images(
    vq: ChameleonVQGAN, pil_images: Sequence[Image.Image], size: int | Sequence[int]
) -> torch.Tensor:
    """PIL images -> codes ``(B, h, w)``: each is centre-cropped and resized to ``size`` (int or ``(height, width)``)."""
    height, width = _size_pair(size)
    vq.latent_size(height, width)
    pixels = to_tensor([center_crop_resize(img.convert("RGB"), height, width) for img in pil_images])
    return vq.encode(pixels)


@torch.no_grad()
def decode_to_images(vq: ChameleonVQGAN, codes: torch.Tensor) -> list[Image.Image]:
    """Codes ``(B, h, w)`` -> RGB PIL images of ``16h x 16w`` pixels."""
    return to_pil(vq.decode(codes))


__all__ = [
    "ChameleonVQGAN",
    "VQCodebook",
    "VQGANConfig",
    "VQGANDecoder",
    "VQGANUpsample",
    "random_vqgan",
    "chameleon_vqgan",
    "chameleon_vqgan_config",
    "decode_to_images",
    "encode_images",
    "tiny_vqgan",
    "tiny_vqgan_config",
]


if __name__ == "__main__":
    # `python -m stylear_core.models.vqgan convert SRC DST` keeps working: the command is vqgan_checkpoint's.
    import sys

    from stylear_core.models.vqgan_checkpoint import main

    sys.exit(main())

"""CLIP on open_clip: the frozen vision tower behind StyleAR's style features and the CLIP-T / CLIP-I scorer.

Two presets build an ``open_clip.CLIP``:

- ``"tiny"``: a random 3-layer ViT (64 px, patch 16, width 64) with a 2-layer text tower, for tests
  and the CPU demo; its tokenizer is open_clip's bundled BPE, so nothing is downloaded.
- ``"ViT-H-14"``: open_clip's ViT-H/14 architecture (the LAION-2B ``laion2b_s32b_b79k`` weights
  StyleAR uses), filled from a local open_clip checkpoint file or directory, never from a hub id.

Any other open_clip built-in architecture name whose towers are open_clip's own (no timm / HF text
tower) also works, e.g. ``"ViT-L-14"``.

The style features are the penultimate-layer hidden states of the vision tower: the output of the
second-to-last transformer block, before ``ln_post`` -- for ViT-H/14 at 224 px a (257, 1280) tensor
per image, the same tensor as transformers' ``CLIPVisionModelWithProjection(...).hidden_states[-2]``
that StyleAR's reference inference code feeds to its resampler.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import VisionTransformer
from PIL import Image
from torch import nn

TINY_CLIP_CONFIG: dict = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 64, "layers": 3, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
"""open_clip model config of the ``"tiny"`` preset (vocab 49408 = the bundled BPE tokenizer's)."""

# What the laion/CLIP-ViT-H-14-laion2B-s32B-b79K snapshot calls its open_clip weights, best first.
# Its ``model.safetensors`` is the transformers layout and is deliberately not picked.
OPEN_CLIP_CHECKPOINT_NAMES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)


@dataclass
class ClipBundle:
    """A built CLIP: ``model`` (``open_clip.CLIP``, eval mode), ``preprocess`` (one PIL image -> a
    normalised ``(3, S, S)`` tensor), ``tokenizer`` (list of prompts -> ``(B, context_length)`` ids)
    and ``image_size`` (``S``)."""

    model: open_clip.CLIP
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: SimpleTokenizer
    image_size: int


def clip_model_config(preset: str) -> dict:
    """The open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``) of a preset name."""
    if preset == "tiny":
        return copy.deepcopy(TINY_CLIP_CONFIG)
    cfg = open_clip.get_model_config(preset)
    if cfg is None:
        raise ValueError(f"unknown CLIP preset {preset!r}: use 'tiny' or an open_clip architecture name")
    if cfg.get("custom_text") or "hf_model_name" in cfg["text_cfg"] or "timm_model_name" in cfg["vision_cfg"]:
        # Such towers would pull weights or tokenizers from a hub and have no VisionTransformer blocks.
        raise ValueError(
            f"CLIP preset {preset!r} needs timm / HF towers; only open_clip ViT towers are supported"
        )
    return cfg


def resolve_clip_checkpoint(checkpoint: str | Path) -> Path:
    """A local open_clip checkpoint: the file itself, or the best-named weights file inside a directory.

    Raises :class:`FileNotFoundError` naming what was looked for when there is none.
    """
    path = Path(checkpoint).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for name in OPEN_CLIP_CHECKPOINT_NAMES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(
            f"no open_clip checkpoint in directory {path}: looked for {', '.join(OPEN_CLIP_CHECKPOINT_NAMES)}"
        )
    raise FileNotFoundError(
        f"CLIP checkpoint {path} does not exist (weights are never downloaded: pass a local open_clip "
        f"file such as open_clip_pytorch_model.bin, or the directory holding it)"
    )


def build_clip(
    preset: str = "tiny",
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> ClipBundle:
    """Build an open_clip CLIP of ``preset`` on ``device`` in eval mode.

    ``checkpoint`` is a local open_clip state-dict file (``.bin`` / ``.pth`` / ``.safetensors``) or a
    directory holding one (see :func:`resolve_clip_checkpoint`); it is loaded strictly. ``None`` leaves
    the random initialisation (tests, the tiny demo, shape checks on the ``"meta"`` device).
    """
    cfg = clip_model_config(preset)
    path = resolve_clip_checkpoint(checkpoint) if checkpoint is not None else None
    if path is not None and torch.device(device).type == "meta":
        raise ValueError("cannot load a CLIP checkpoint onto the meta device")
    with torch.device(device):
        model = open_clip.CLIP(**cfg)
    if path is not None:
        # open_clip's loader handles .safetensors vs torch files, a "state_dict" wrapper, "module."
        # prefixes and positional-embedding resizing, then loads strictly.
        open_clip.load_checkpoint(model, str(path), strict=True)
    model = model.to(dtype=dtype).eval()
    image_size = model.visual.image_size[0]
    return ClipBundle(
        model=model,
        preprocess=open_clip.image_transform(image_size, is_train=False),
        tokenizer=SimpleTokenizer(context_length=cfg["text_cfg"].get("context_length", 77)),
        image_size=image_size,
    )


def _stack_preprocessed(
    preprocess: Callable[[Image.Image], torch.Tensor], images: Sequence[Image.Image]
) -> torch.Tensor:
    if len(images) == 0:
        raise ValueError("no images given")
    return torch.stack([preprocess(im) for im in images])


class ClipVisionTower(nn.Module):
    """Frozen CLIP vision tower giving StyleAR's style features.

    Takes an open_clip :class:`VisionTransformer` (and its eval preprocessing); ``forward(pixels)`` maps
    CLIP-normalised pixels ``(B, 3, S, S)`` to the penultimate-layer hidden states
    ``(B, 1 + patches, width)`` (class token first, before ``ln_post``). All parameters are frozen and
    the tower stays in eval mode even under ``.train()``, so checkpoints that keep trainable
    parameters only (adapters, the resampler) never contain it.
    """

    def __init__(self, visual: VisionTransformer, preprocess: Callable[[Image.Image], torch.Tensor]):
        super().__init__()
        if not isinstance(visual, VisionTransformer):
            raise TypeError(
                f"ClipVisionTower needs an open_clip VisionTransformer, got {type(visual).__name__}"
            )
        if len(visual.transformer.resblocks) < 2:
            raise ValueError("the vision tower needs at least 2 blocks to have a penultimate layer")
        self.visual = visual
        self.visual.requires_grad_(False)
        self.visual.eval()
        self._preprocess = preprocess

    @classmethod
    def from_preset(
        cls,
        preset: str = "tiny",
        checkpoint: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> ClipVisionTower:
        """The vision tower of a :func:`build_clip` preset (the text tower is dropped)."""
        bundle = build_clip(preset, checkpoint=checkpoint, device=device, dtype=dtype)
        return cls(bundle.model.visual, bundle.preprocess)

    @property
    def width(self) -> int:
        """Feature size of each token (1280 for ViT-H/14)."""
        return self.visual.transformer.width

    @property
    def num_tokens(self) -> int:
        """Tokens per image: class token + patches (257 for ViT-H/14 at 224 px)."""
        return self.visual.grid_size[0] * self.visual.grid_size[1] + 1

    @property
    def image_size(self) -> int:
        """Side of the square input in pixels."""
        return self.visual.image_size[0]

    def train(self, mode: bool = True) -> ClipVisionTower:
        """Mode switches of a parent module never put the frozen tower in training mode."""
        super().train(mode)
        self.visual.eval()
        return self

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> CLIP-normalised ``(B, 3, S, S)`` float tensor on the CPU (resize, centre crop)."""
        return _stack_preprocessed(self._preprocess, images)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised pixels ``(B, 3, S, S)`` -> penultimate hidden states ``(B, 1 + patches, width)``."""
        penultimate = len(self.visual.transformer.resblocks) - 2
        weight = self.visual.conv1.weight
        # open_clip runs conv1, class + positional embedding, patch dropout, ln_pre and the blocks up to
        # ``penultimate`` (stop_early skips the last block); the class token comes back split off.
        out = self.visual.forward_intermediates(
            pixels.to(device=weight.device, dtype=weight.dtype),
            indices=[penultimate],
            stop_early=True,
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=True,
        )
        return torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)

    def encode(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> style features ``(B, 1 + patches, width)`` on the encoder's device."""
        return self(self.preprocess(images))


class ClipScorer:
    """CLIP metrics over PIL images and prompts, as DreamBench computes them.

    Built from a :class:`ClipBundle`; features are L2-normalised CLIP embeddings. Scores are plain
    cosine similarities in [-1, 1] (not multiplied by 100 and not clipped at 0, unlike CLIPScore), the
    scale DreamBooth / DreamBench report CLIP-T and CLIP-I in (CLIP-T around 0.3). Inputs are encoded
    in chunks of ``batch_size``; results are float32 on the CPU.
    """

    def __init__(self, bundle: ClipBundle, batch_size: int = 32):
        self.bundle = bundle
        self.batch_size = batch_size

    @classmethod
    def from_preset(
        cls,
        preset: str = "tiny",
        checkpoint: str | Path | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
    ) -> ClipScorer:
        """A scorer over :func:`build_clip` ``(preset, checkpoint, device)``."""
        return cls(build_clip(preset, checkpoint=checkpoint, device=device), batch_size=batch_size)

    @property
    def _weight(self) -> torch.Tensor:
        return self.bundle.model.visual.conv1.weight

    @torch.inference_mode()
    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> L2-normalised image embeddings ``(B, embed_dim)``."""
        chunks = []
        for start in range(0, len(images), self.batch_size):
            pixels = _stack_preprocessed(self.bundle.preprocess, images[start : start + self.batch_size])
            pixels = pixels.to(device=self._weight.device, dtype=self._weight.dtype)
            feats = self.bundle.model.encode_image(pixels)
            chunks.append(feats.float().cpu())
        if not chunks:
            raise ValueError("no images given")
        # Normalised in fp32 so that bf16/fp16 weights still give unit vectors.
        return F.normalize(torch.cat(chunks), dim=-1)

    @torch.inference_mode()
    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> L2-normalised text embeddings ``(B, embed_dim)`` (prompts longer than the context
        are truncated by the tokenizer, keeping the end-of-text token)."""
        chunks = []
        for start in range(0, len(prompts), self.batch_size):
            tokens = self.bundle.tokenizer(list(prompts[start : start + self.batch_size]))
            feats = self.bundle.model.encode_text(tokens.to(self._weight.device))
            chunks.append(feats.float().cpu())
        if not chunks:
            raise ValueError("no prompts given")
        return F.normalize(torch.cat(chunks), dim=-1)

    def text_score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """CLIP-T: cosine of each image with its prompt, ``(B,)`` for ``B`` (image, prompt) pairs."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        return (self.image_features(images) * self.text_features(prompts)).sum(dim=-1)

    def image_similarity(
        self, images_a: Sequence[Image.Image], images_b: Sequence[Image.Image]
    ) -> torch.Tensor:
        """CLIP-I: cosine of ``images_a[i]`` with ``images_b[i]``, ``(B,)``."""
        if len(images_a) != len(images_b):
            raise ValueError(f"{len(images_a)} images against {len(images_b)}")
        return (self.image_features(images_a) * self.image_features(images_b)).sum(dim=-1)

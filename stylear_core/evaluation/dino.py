"""DINO ViT-S/16 image features: DreamBench's subject-fidelity embedding.

DINO (Caron et al., 2021, "Emerging Properties in Self-Supervised Vision Transformers",
arXiv:2104.14294) ViT-S/16 is the feature extractor DreamBooth's DINO metric uses: the class token of
the last layer (after the final LayerNorm) of ``dino_vits16``. The network is transformers'
:class:`~transformers.ViTModel` (patch 16, width 384, 12 layers, 6 heads, LayerNorm eps 1e-6), filled
from local weights only:

* a transformers directory (``config.json`` + weights, e.g. a snapshot of ``facebook/dino-vits16``;
  transformers maps that checkpoint's older key names itself), or
* the original DINO release file (``dino_deitsmall16_pretrain.pth``, the ``torch.hub`` ``dino_vits16``
  weights; also timm's ``vit_small_patch16_224.dino``), whose ``blocks.{i}.attn.qkv`` layout
  :func:`convert_dino_state_dict` maps onto the ViTModel.

Images are preprocessed as DINO's evaluation code does: bicubic resize of the short side to
``256/224`` of the input size, centre crop, ImageNet mean/std normalisation.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms
from transformers import ViTConfig, ViTModel

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DINO_VITS16 = {
    "image_size": 224,
    "patch_size": 16,
    "hidden_size": 384,
    "num_hidden_layers": 12,
    "num_attention_heads": 6,
    "intermediate_size": 1536,
    "layer_norm_eps": 1e-6,
    "qkv_bias": True,
    "hidden_act": "gelu",
}
"""ViTConfig fields of DINO ViT-S/16."""

TINY_DINO = {
    **DINO_VITS16,
    "image_size": 32,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,  # ViT-S's MLP ratio 4
}
"""A toy ViT of the same family for tests: 32 px, 2 layers, width 32, MLP ratio 4."""

DINO_PRESETS = {"vits16": DINO_VITS16, "tiny": TINY_DINO}


def dino_vit_config(preset: str = "vits16") -> ViTConfig:
    """The :class:`~transformers.ViTConfig` of a DINO preset ("vits16" or "tiny")."""
    if preset not in DINO_PRESETS:
        raise ValueError(f"unknown DINO preset {preset!r} (known: {sorted(DINO_PRESETS)})")
    return ViTConfig(**DINO_PRESETS[preset])


def convert_dino_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original DINO / timm ViT state dict -> :class:`~transformers.ViTModel` keys.

    Accepts the plain backbone dict and DINO's training checkpoints (``{"teacher": ...}`` with
    ``module.`` / ``backbone.`` prefixes); the projection ``head`` is dropped. Fused ``qkv`` projections
    are split into query, key and value. Unknown keys raise :class:`KeyError`.
    """
    if "teacher" in state_dict and isinstance(state_dict["teacher"], dict):
        state_dict = state_dict["teacher"]
    elif "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    fixed = {
        "cls_token": "embeddings.cls_token",
        "pos_embed": "embeddings.position_embeddings",
        "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
        "norm.weight": "layernorm.weight",
        "norm.bias": "layernorm.bias",
    }
    per_block = {
        "norm1": "layernorm_before",
        "norm2": "layernorm_after",
        "attn.proj": "attention.o_proj",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    out: dict[str, torch.Tensor] = {}
    for raw_key, value in state_dict.items():
        key = re.sub(r"^(module\.)?(backbone\.)?", "", raw_key)
        if key.startswith("head."):
            continue
        if key in fixed:
            out[fixed[key]] = value
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", key)
        if m is None:
            raise KeyError(f"unexpected key {raw_key!r} in a DINO ViT state dict")
        block, name, kind = m.groups()
        if name == "attn.qkv":
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"layers.{block}.attention.{part}.{kind}"] = chunk.clone()
        elif name in per_block:
            out[f"layers.{block}.{per_block[name]}.{kind}"] = value
        else:
            raise KeyError(f"unexpected key {raw_key!r} in a DINO ViT state dict")
    return out


class DinoFeatureExtractor:
    """DINO class-token embeddings of PIL images.

    Wraps a :class:`~transformers.ViTModel` (eval mode, no pooler); :meth:`image_features` gives
    L2-normalised ``(B, hidden)`` float32 features on the CPU, encoded in chunks of ``batch_size``.
    """

    def __init__(self, model: ViTModel, batch_size: int = 32):
        self.model = model.eval()
        self.batch_size = batch_size
        size = model.config.image_size
        self.transform = transforms.Compose(
            [
                transforms.Resize(
                    round(size * 256 / 224), interpolation=transforms.InterpolationMode.BICUBIC
                ),
                transforms.CenterCrop(size),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    @classmethod
    def from_preset(
        cls,
        preset: str = "vits16",
        checkpoint: str | Path | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
    ) -> DinoFeatureExtractor:
        """A preset ViT, random (``checkpoint`` None: tests, the tiny demo) or filled from local weights.

        ``checkpoint`` is a transformers directory (``config.json`` decides the architecture there) or an
        original DINO ``.pth`` / ``.safetensors`` file (loaded strictly into the preset's architecture).
        Raises :class:`FileNotFoundError` for a missing path (nothing is downloaded).
        """
        if checkpoint is None:
            model = ViTModel(dino_vit_config(preset), add_pooling_layer=False)
        else:
            path = Path(checkpoint).expanduser()
            if path.is_dir() and (path / "config.json").is_file():
                model = ViTModel.from_pretrained(str(path), add_pooling_layer=False, local_files_only=True)
            elif path.is_file():
                if path.suffix == ".safetensors":
                    from safetensors.torch import load_file

                    raw = load_file(str(path))
                else:
                    raw = torch.load(str(path), map_location="cpu", weights_only=True)
                model = ViTModel(dino_vit_config(preset), add_pooling_layer=False)
                model.load_state_dict(convert_dino_state_dict(raw), strict=True)
            else:
                raise FileNotFoundError(
                    f"DINO checkpoint {path} is neither a transformers directory (config.json) nor a file; "
                    f"pass a local copy of dino_vits16 (weights are never downloaded)"
                )
        return cls(model.to(device), batch_size=batch_size)

    @property
    def image_size(self) -> int:
        """Side of the square model input in pixels (224 for ViT-S/16)."""
        return self.model.config.image_size

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> normalised ``(B, 3, S, S)`` pixels (DINO's evaluation transform)."""
        if len(images) == 0:
            raise ValueError("no images given")
        return torch.stack([self.transform(im.convert("RGB")) for im in images])

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels ``(B, 3, S, S)`` -> class-token features ``(B, hidden)`` (not normalised)."""
        weight = self.model.embeddings.patch_embeddings.projection.weight
        out = self.model(pixel_values=pixels.to(weight.device, weight.dtype))
        return out.last_hidden_state[:, 0]

    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> L2-normalised DINO features ``(B, hidden)``, float32 on the CPU."""
        chunks = [
            self.encode(self.preprocess(images[start : start + self.batch_size])).float().cpu()
            for start in range(0, len(images), self.batch_size)
        ]
        if not chunks:
            raise ValueError("no images given")
        return torch.nn.functional.normalize(torch.cat(chunks), dim=-1)

"""DINO ViT-S/16 features: the original release layout converts onto transformers' ViTModel exactly."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from stylear_core.evaluation.dino import (
    DinoFeatureExtractor,
    convert_dino_state_dict,
    dino_vit_config,
)


def _timm_vit(embed_dim: int, depth: int, heads: int, img_size: int) -> torch.nn.Module:
    # timm's ViT has the original DINO key layout (blocks.{i}.attn.qkv, norm, pos_embed, ...).
    return timm.models.vision_transformer.VisionTransformer(
        img_size=img_size, patch_size=16, embed_dim=embed_dim, depth=depth, num_heads=heads, num_classes=0
    ).eval()


def _images(n: int = 3, size: int = 40) -> list[Image.Image]:
    g = torch.Generator().manual_seed(1)
    return [
        Image.fromarray(torch.randint(0, 256, (size, size + 8, 3), generator=g, dtype=torch.uint8).numpy())
        for _ in range(n)
    ]


def test_converted_dino_checkpoint_matches_the_original_features(tmp_path: Path):
    reference = _timm_vit(embed_dim=32, depth=2, heads=2, img_size=32)
    path = tmp_path / "dino_tiny.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in reference.state_dict().items()}}, path)
    dino = DinoFeatureExtractor.from_preset("tiny", checkpoint=path)
    pixels = dino.preprocess(_images())
    assert pixels.shape == (3, 3, 32, 32)
    with torch.no_grad():
        expected = reference.forward_features(pixels)[:, 0]  # class token after the final norm
    torch.testing.assert_close(dino.encode(pixels), expected, rtol=1e-4, atol=1e-5)
    features = dino.image_features(_images())
    torch.testing.assert_close(
        features, torch.nn.functional.normalize(expected, dim=-1), rtol=1e-4, atol=1e-5
    )


def test_vits16_release_layout_loads_strictly_into_the_preset(tmp_path: Path):
    # Random weights in the layout and shapes of dino_deitsmall16_pretrain.pth (ViT-S/16, 224 px).
    release = _timm_vit(embed_dim=384, depth=12, heads=6, img_size=224).state_dict()
    assert release["pos_embed"].shape == (1, 197, 384) and release["blocks.11.attn.qkv.weight"].shape == (
        1152,
        384,
    )
    save_file(release, tmp_path / "dino_vits16.safetensors")
    dino = DinoFeatureExtractor.from_preset("vits16", checkpoint=tmp_path / "dino_vits16.safetensors")
    config = dino.model.config
    assert (config.patch_size, config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (
        16,
        384,
        12,
        6,
    )
    q, k, v = release["blocks.3.attn.qkv.weight"].chunk(3)
    torch.testing.assert_close(dino.model.state_dict()["layers.3.attention.k_proj.weight"], k)
    assert dino.image_size == 224


def test_transformers_directory_round_trip(tmp_path: Path):
    tiny = DinoFeatureExtractor.from_preset("tiny")
    tiny.model.save_pretrained(tmp_path / "dino")
    loaded = DinoFeatureExtractor.from_preset("tiny", checkpoint=tmp_path / "dino")
    torch.testing.assert_close(loaded.image_features(_images()), tiny.image_features(_images()))


def test_hub_layout_directory_loads(tmp_path: Path):
    # A facebook/dino-vits16 snapshot has older transformers names (encoder.layer.N.attention.attention...).
    tiny = DinoFeatureExtractor.from_preset("tiny")
    renames = [
        (r"^layers\.(\d+)\.attention\.([qkv])_proj", None),
        (r"^layers\.(\d+)\.attention\.o_proj", r"encoder.layer.\1.attention.output.dense"),
        (r"^layers\.(\d+)\.mlp\.fc1", r"encoder.layer.\1.intermediate.dense"),
        (r"^layers\.(\d+)\.mlp\.fc2", r"encoder.layer.\1.output.dense"),
        (r"^layers\.(\d+)\.", r"encoder.layer.\1."),
    ]
    names = {"q": "query", "k": "key", "v": "value"}
    hub = {}
    for key, value in tiny.model.state_dict().items():
        for pattern, target in renames:
            m = re.match(pattern, key)
            if m:
                if target is None:
                    new = (
                        f"encoder.layer.{m.group(1)}.attention.attention.{names[m.group(2)]}" + key[m.end() :]
                    )
                else:
                    new = re.sub(pattern, target, key)
                key = new
                break
        hub[key] = value.clone()
    hub["pooler.dense.weight"] = torch.zeros(32, 32)  # the hub checkpoint carries an unused pooler
    hub["pooler.dense.bias"] = torch.zeros(32)
    assert (
        "encoder.layer.1.attention.attention.value.bias" in hub
        and "encoder.layer.0.output.dense.weight" in hub
    )
    tiny.model.config.save_pretrained(tmp_path / "hub")
    save_file(hub, tmp_path / "hub" / "model.safetensors")
    loaded = DinoFeatureExtractor.from_preset("tiny", checkpoint=tmp_path / "hub")
    torch.testing.assert_close(loaded.image_features(_images()), tiny.image_features(_images()))


def test_bad_inputs_are_named(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        DinoFeatureExtractor.from_preset("tiny", checkpoint=tmp_path / "absent.pth")
    with pytest.raises(KeyError, match="blocks.0.attn.relative_bias"):
        convert_dino_state_dict({"blocks.0.attn.relative_bias.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unknown DINO preset"):
        dino_vit_config("vitb8")

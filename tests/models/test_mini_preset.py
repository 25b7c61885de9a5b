"""The ``mini`` preset: the miniature world's sizes, 8 px per VQ code, trained weights from local paths."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from stylear_core.data.layout import ImageTokenLayout
from stylear_core.models.config import ModelConfig
from stylear_core.models.presets import build_backbone, build_stylear_model, build_vqgan
from stylear_core.models.vqgan import mini_vqgan_config, random_vqgan
from stylear_core.models.vqgan_checkpoint import vqgan_config_from_yaml, vqgan_config_to_yaml


def test_mini_vocab_lays_out_a_64px_image_as_8x8_codes():
    model = build_stylear_model(ModelConfig(preset="mini", image_size=64))
    layout = ImageTokenLayout.for_resolution(64, 64, model.vocab)
    assert (layout.h_latent, layout.w_latent) == (8, 8)
    assert layout.header[1:] == [model.vocab.grid_base + 4] * 2  # a grid token stays two codes
    vq = build_vqgan(ModelConfig(preset="mini"), model.vocab)
    codes = vq.encode(torch.zeros(1, 3, 64, 64))
    assert codes.shape == (1, 8, 8)
    # Chameleon's vocab keeps 16 px per code: the same 64 px image is 4x4 codes there.
    assert ImageTokenLayout.for_resolution(64, 64).h_latent == 4


def test_mini_preset_loads_the_trained_vqgan_and_base_from_their_paths(tmp_path):
    trained = random_vqgan(mini_vqgan_config(), seed=123)
    save_file(
        {k: v.contiguous() for k, v in trained.state_dict().items()}, str(tmp_path / "vqgan.safetensors")
    )
    (tmp_path / "vqgan.yaml").write_text(vqgan_config_to_yaml(trained.config))
    assert vqgan_config_from_yaml(tmp_path / "vqgan.yaml") == trained.config
    backbone, vocab = build_backbone(ModelConfig(preset="mini", seed=5))
    backbone.save_pretrained(str(tmp_path / "base"), safe_serialization=True)
    cfg = ModelConfig(
        preset="mini",
        backbone_path=str(tmp_path / "base"),
        vqgan_ckpt=str(tmp_path / "vqgan.safetensors"),
        vqgan_yaml=str(tmp_path / "vqgan.yaml"),
    )
    loaded, loaded_vocab = build_backbone(cfg)
    assert loaded_vocab == vocab
    for (name, a), (_, b) in zip(backbone.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    vq = build_vqgan(cfg, vocab)
    assert torch.equal(vq.quantize.embedding.weight, trained.quantize.embedding.weight)
    # Without the paths the preset is random: a different seed gives different weights.
    random_backbone, _ = build_backbone(ModelConfig(preset="mini", seed=6))
    first = next(iter(backbone.state_dict()))
    assert not torch.equal(random_backbone.state_dict()[first], backbone.state_dict()[first])

"""Chameleon VQGAN: shapes, quantiser, parity with transformers / diffusers, and the taming checkpoint loader."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml
from diffusers import VQModel
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from PIL import Image
from transformers import ChameleonVQVAE, ChameleonVQVAEConfig

from stylear_core.models.vqgan import (
    ChameleonVQGAN,
    VQGANConfig,
    chameleon_vqgan_config,
    decode_to_images,
    encode_images,
    tiny_vqgan,
    tiny_vqgan_config,
)
from stylear_core.models.vqgan_checkpoint import load_chameleon_vqgan, vqgan_config_from_yaml


@pytest.fixture(scope="module")
def vq() -> ChameleonVQGAN:
    return tiny_vqgan(seed=0)


def _pixels(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=gen) * 2 - 1


def taming_vqgan_shapes(cfg: VQGANConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a taming ``VQModel`` state dict, written from taming's Encoder/Decoder constructors."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name: str, cin: int, cout: int, k: int) -> None:
        shapes[f"{name}.weight"] = (cout, cin, k, k)
        shapes[f"{name}.bias"] = (cout,)

    def norm(name: str, c: int) -> None:
        shapes[f"{name}.weight"] = (c,)
        shapes[f"{name}.bias"] = (c,)

    def resnet(name: str, cin: int, cout: int) -> None:
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attn(name: str, c: int) -> None:
        norm(f"{name}.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", c, c, 1)

    levels = len(cfg.ch_mult)
    conv("encoder.conv_in", cfg.in_channels, cfg.ch, 3)
    res, in_mult = cfg.resolution, (1, *cfg.ch_mult)
    for i in range(levels):
        block_in, block_out = cfg.ch * in_mult[i], cfg.ch * cfg.ch_mult[i]
        for j in range(cfg.num_res_blocks):
            resnet(f"encoder.down.{i}.block.{j}", block_in, block_out)
            block_in = block_out
            if res in cfg.attn_resolutions:
                attn(f"encoder.down.{i}.attn.{j}", block_in)
        if i != levels - 1:
            conv(f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
            res //= 2
    resnet("encoder.mid.block_1", block_in, block_in)
    attn("encoder.mid.attn_1", block_in)
    resnet("encoder.mid.block_2", block_in, block_in)
    norm("encoder.norm_out", block_in)
    conv("encoder.conv_out", block_in, cfg.z_channels, 3)

    block_in, res = cfg.ch * cfg.ch_mult[-1], cfg.resolution // 2 ** (levels - 1)
    conv("decoder.conv_in", cfg.z_channels, block_in, 3)
    resnet("decoder.mid.block_1", block_in, block_in)
    attn("decoder.mid.attn_1", block_in)
    resnet("decoder.mid.block_2", block_in, block_in)
    for i in reversed(range(levels)):
        block_out = cfg.ch * cfg.ch_mult[i]
        for j in range(cfg.num_res_blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", block_in, block_out)
            block_in = block_out
            if res in cfg.attn_resolutions:
                attn(f"decoder.up.{i}.attn.{j}", block_in)
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", block_in, block_in, 3)
            res *= 2
    norm("decoder.norm_out", block_in)
    conv("decoder.conv_out", block_in, cfg.out_ch, 3)

    shapes["quantize.embedding.weight"] = (cfg.n_embed, cfg.embed_dim)
    conv("quant_conv", cfg.z_channels, cfg.embed_dim, 1)
    conv("post_quant_conv", cfg.embed_dim, cfg.z_channels, 1)
    return shapes


def write_taming_checkpoint(
    tmp_path,
    state_dict: dict[str, torch.Tensor],
    cfg: VQGANConfig,
    extra: dict | None = None,
    **ddconfig_overrides,
):
    """A Meta-style ``vqgan.ckpt`` (with training-only ``loss.*`` weights) and ``vqgan.yaml`` in ``tmp_path``.

    ``extra`` adds top-level checkpoint entries (e.g. Lightning's ``hparams`` or ``callbacks``).
    """
    ckpt = {
        **(extra or {}),
        "epoch": 0,
        "global_step": 190000,
        "state_dict": {
            **state_dict,
            "loss.discriminator.main.0.weight": torch.randn(64, 3, 4, 4),
            "loss.perceptual_loss.net.slice1.0.weight": torch.randn(64, 3, 3, 3),
        },
    }
    ddconfig = {
        "double_z": False,
        "z_channels": cfg.z_channels,
        "resolution": cfg.resolution,
        "in_channels": cfg.in_channels,
        "out_ch": cfg.out_ch,
        "ch": cfg.ch,
        "ch_mult": list(cfg.ch_mult),
        "num_res_blocks": cfg.num_res_blocks,
        "attn_resolutions": list(cfg.attn_resolutions),
        "dropout": cfg.dropout,
        **ddconfig_overrides,
    }
    doc = {
        "model": {
            "base_learning_rate": 4.5e-06,
            "target": "taming.models.vqgan.VQModel",
            "params": {
                "embed_dim": cfg.embed_dim,
                "n_embed": cfg.n_embed,
                "ddconfig": ddconfig,
                "lossconfig": {
                    "target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                    "params": {"disc_start": 100001, "perceptual_weight": 1.0},
                },
                "ckpt_path": "/checkpoints/vqgan.ckpt",
            },
        }
    }
    ckpt_path, yaml_path = tmp_path / "vqgan.ckpt", tmp_path / "vqgan.yaml"
    torch.save(ckpt, ckpt_path)
    yaml_path.write_text(yaml.safe_dump(doc))
    return ckpt_path, yaml_path


# --- shapes and round trips -------------------------------------------------------------------


@pytest.mark.parametrize("height, width", [(64, 64), (64, 96)])
def test_encode_decode_round_trip_keeps_image_size(vq, height, width):
    gen = torch.Generator().manual_seed(1)
    array = torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8).numpy()
    image = Image.fromarray(array)

    codes = encode_images(vq, [image], (height, width))
    assert codes.shape == (1, height // 16, width // 16)
    assert codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < vq.codebook_size == 256

    images = decode_to_images(vq, codes)
    assert len(images) == 1 and images[0].size == (width, height) and images[0].mode == "RGB"


def test_downsample_and_size_checks(vq):
    assert vq.downsample == 16 and tiny_vqgan_config().downsample == 16
    assert vq.latent_size(48, 80) == (3, 5)
    with pytest.raises(ValueError, match="multiple of 16"):
        vq.encode(_pixels(1, 64, 72))
    with pytest.raises(ValueError, match=r"codes must be in \[0, 256\)"):
        vq.decode(torch.full((1, 2, 2), 256))
    with pytest.raises(ValueError, match="integer codes"):
        vq.decode(torch.zeros(1, 2, 2))


def test_tiny_vqgan_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = tiny_vqgan(seed=0), tiny_vqgan(seed=0), tiny_vqgan(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert not torch.equal(a.decoder.conv_out.weight, c.decoder.conv_out.weight)
    assert not a.training


def test_decoder_passes_gradients(vq):
    latents = vq.codes_to_latents(torch.randint(0, 256, (1, 2, 2))).detach().requires_grad_(True)
    vq.decode_latents(latents).square().mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    assert vq.decoder.conv_in.weight.grad is not None
    vq.zero_grad(set_to_none=True)


# --- quantiser ------------------------------------------------------------------------------------


def test_codes_are_the_nearest_codebook_entries(vq):
    x = _pixels(2, 32, 48, seed=3)
    codes = vq.encode(x)
    with torch.no_grad():
        latents = vq.encode_latents(x)
    flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    expected = torch.cdist(flat, vq.quantize.embedding.weight).argmin(dim=1)
    assert torch.equal(codes.flatten(), expected)
    assert codes.unique().numel() > 4  # the check is not passed by one code everywhere


def test_codebook_vectors_quantise_to_their_own_code(vq):
    codes = torch.randperm(256, generator=torch.Generator().manual_seed(0))[:24].view(2, 3, 4)
    with torch.no_grad():
        assert torch.equal(vq.quantize.nearest_codes(vq.codes_to_latents(codes)), codes)


# --- parity with published implementations ---------------------------------------------------------


def test_encoder_and_quantiser_match_transformers_chameleon_vqvae(vq):
    cfg = vq.config
    hf_config = ChameleonVQVAEConfig(
        embed_dim=cfg.embed_dim,
        num_embeddings=cfg.n_embed,
        latent_channels=cfg.z_channels,
        resolution=cfg.resolution,
        base_channels=cfg.ch,
        channel_multiplier=list(cfg.ch_mult),
        num_res_blocks=cfg.num_res_blocks,
        attn_resolutions=list(cfg.attn_resolutions),
    )
    reference = ChameleonVQVAE(hf_config).eval()
    encoder_keys = {k: v for k, v in vq.state_dict().items() if not k.startswith("decoder.")}
    reference.load_state_dict(encoder_keys, strict=True)  # same taming key names, nothing left over

    x = _pixels(2, 32, 48, seed=4)
    with torch.no_grad():
        tokens = reference.encode(x).image_tokens
    assert torch.equal(tokens.view(2, 2, 3), vq.encode(x))


def test_encoder_and_decoder_match_diffusers_vqmodel(vq):
    cfg = vq.config
    diffusers_config = {
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_ch,
        "down_block_types": ("DownEncoderBlock2D",) * len(cfg.ch_mult),
        "up_block_types": ("UpDecoderBlock2D",) * len(cfg.ch_mult),
        "block_out_channels": tuple(cfg.ch * m for m in cfg.ch_mult),
        "layers_per_block": cfg.num_res_blocks,
        "latent_channels": cfg.z_channels,
        "num_vq_embeddings": cfg.n_embed,
        "vq_embed_dim": cfg.embed_dim,
        "norm_num_groups": 32,
        "sample_size": cfg.resolution,
    }
    reference = VQModel(**diffusers_config).eval()
    # diffusers' own converter for taming/LDM autoencoder keys; it leaves the codebook to the caller.
    converted = convert_ldm_vae_checkpoint(dict(vq.state_dict()), diffusers_config)
    converted["quantize.embedding.weight"] = vq.state_dict()["quantize.embedding.weight"]
    reference.load_state_dict(converted, strict=True)

    x = _pixels(1, 32, 48, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(vq.encode_latents(x), reference.encode(x).latents, atol=1e-4, rtol=1e-4)
        latents = vq.codes_to_latents(vq.encode(x))
        ours = vq.decode_latents(latents)
        theirs = reference.decode(latents, force_not_quantize=True).sample
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-4)
    assert ours.std() > 0.01


# --- checkpoint layout and loader --------------------------------------------------------------------


@pytest.mark.parametrize("attn_resolutions", [[], [8, 4]])
def test_state_dict_is_the_taming_layout(attn_resolutions):
    cfg = dataclasses.replace(tiny_vqgan_config(), attn_resolutions=attn_resolutions)
    model = ChameleonVQGAN(cfg).eval()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == taming_vqgan_shapes(cfg)
    if attn_resolutions:  # level attention is wired into both forward passes
        assert "decoder.up.3.attn.1.q.weight" in model.state_dict()
        assert model.decode(model.encode(_pixels(1, 32, 48))).shape == (1, 3, 32, 48)


def test_real_size_model_on_meta_device():
    cfg = chameleon_vqgan_config()
    assert (cfg.n_embed, cfg.embed_dim, cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.z_channels) == (
        8192,
        256,
        128,
        [1, 1, 2, 2, 4],
        2,
        256,
    )
    with torch.device("meta"):
        model = ChameleonVQGAN(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == taming_vqgan_shapes(cfg)
    assert shapes["quantize.embedding.weight"] == (8192, 256)
    assert shapes["encoder.conv_out.weight"] == (256, 512, 3, 3)
    assert shapes["decoder.conv_out.weight"] == (3, 128, 3, 3)
    assert model.downsample == 16 and model.codebook_size == 8192
    total = sum(p.numel() for p in model.parameters())
    decoder = sum(p.numel() for p in model.decoder.parameters())
    assert total == 68_718_467 and decoder == 39_294_851


def test_loader_reads_meta_checkpoint_layout(vq, tmp_path):
    ckpt_path, yaml_path = write_taming_checkpoint(tmp_path, vq.state_dict(), vq.config)
    assert vqgan_config_from_yaml(yaml_path) == vq.config

    loaded = load_chameleon_vqgan(ckpt_path, yaml_path)
    assert not loaded.training
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in vq.state_dict().items())
    x = _pixels(1, 32, 48, seed=6)
    codes = vq.encode(x)
    assert torch.equal(loaded.encode(x), codes)
    with torch.no_grad():
        pixels = loaded.decode(codes)
        assert torch.equal(pixels, vq.decode(codes))
    assert pixels.shape == (1, 3, 32, 48) and pixels.min() >= -1.0 and pixels.max() <= 1.0


@pytest.mark.parametrize(
    "corrupt, named_key",
    [
        ("rename", "decoder.up.1.block.0.conv1.weight"),
        ("reshape", "quantize.embedding.weight"),
        ("drop", "post_quant_conv.bias"),
        ("extra", "decoder.up.0.attn.0.q.weight"),
    ],
)
def test_loader_rejects_a_mismatched_checkpoint(vq, tmp_path, corrupt, named_key):
    state = dict(vq.state_dict())
    if corrupt == "rename":
        state[named_key.replace("conv1", "conv_1")] = state.pop(named_key)
    elif corrupt == "reshape":
        state[named_key] = state[named_key][:-1]
    elif corrupt == "drop":
        del state[named_key]
    else:
        state[named_key] = torch.zeros(32, 32, 1, 1)
    ckpt_path, yaml_path = write_taming_checkpoint(tmp_path, state, vq.config)
    with pytest.raises(ValueError, match=named_key.replace(".", r"\.")):
        load_chameleon_vqgan(ckpt_path, yaml_path)


def test_loader_checks_the_yaml_against_the_weights(vq, tmp_path):
    bigger = dataclasses.replace(vq.config, n_embed=512)
    ckpt_path, yaml_path = write_taming_checkpoint(tmp_path, vq.state_dict(), bigger)
    with pytest.raises(
        ValueError, match=r"quantize\.embedding\.weight \(checkpoint \(256, 32\), model \(512, 32\)\)"
    ):
        load_chameleon_vqgan(ckpt_path, yaml_path)

    _, yaml_path = write_taming_checkpoint(tmp_path, vq.state_dict(), vq.config, double_z=True)
    with pytest.raises(ValueError, match="double_z"):
        vqgan_config_from_yaml(yaml_path)

    _, yaml_path = write_taming_checkpoint(tmp_path, vq.state_dict(), vq.config, ch=48)
    with pytest.raises(ValueError, match="GroupNorm"):
        vqgan_config_from_yaml(yaml_path)


class TrainerState:
    """Stands for a training-framework object pickled into a checkpoint (not on any allow-list)."""

    def __init__(self) -> None:
        self.step = 3


def lightning_entries() -> dict:
    """The non-tensor entries a PyTorch Lightning checkpoint carries beside ``state_dict``."""
    import argparse
    import pathlib

    import numpy as np

    return {
        "pytorch-lightning_version": "1.0.8",
        "global_step": np.int64(190000),
        "hparams": argparse.Namespace(ckpt_path=pathlib.PosixPath("/checkpoints/last.ckpt"), lr=4.5e-6),
        "callbacks": {
            "ModelCheckpoint": {
                "best_model_score": torch.tensor(0.25),
                "best_model_path": pathlib.PurePosixPath("/checkpoints/best.ckpt"),
                "monitor_value": np.float64(0.25),
                "history": np.arange(4, dtype=np.float32),
            }
        },
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 4.5e-6, "betas": (0.5, 0.9)}]}],
        "lr_schedulers": [],
    }


def test_loader_reads_a_lightning_checkpoint_with_non_tensor_entries(vq, tmp_path):
    ckpt_path, yaml_path = write_taming_checkpoint(
        tmp_path, vq.state_dict(), vq.config, extra=lightning_entries()
    )
    loaded = load_chameleon_vqgan(ckpt_path, yaml_path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in vq.state_dict().items())


def test_unsafe_checkpoint_is_refused_naming_the_object_and_converts_once(vq, tmp_path):
    from safetensors.torch import load_file

    from stylear_core.models.vqgan_checkpoint import main

    extra = {**lightning_entries(), "trainer": TrainerState()}
    ckpt_path, yaml_path = write_taming_checkpoint(tmp_path, vq.state_dict(), vq.config, extra=extra)
    with pytest.raises(
        ValueError, match=r"TrainerState.*python -m stylear_core\.models\.vqgan_checkpoint convert"
    ):
        load_chameleon_vqgan(ckpt_path, yaml_path)

    out = tmp_path / "vqgan.safetensors"
    assert main(["convert", str(ckpt_path), str(out)]) == 0
    assert not any(k.startswith("loss.") for k in load_file(str(out)))
    loaded = load_chameleon_vqgan(out, yaml_path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in vq.state_dict().items())

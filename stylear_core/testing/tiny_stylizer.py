"""A tiny random SDXL + IP-Adapter, saved in the real on-disk layouts the curation stylizer loads.

:func:`build_tiny_sdxl_stylizer_dir` writes a diffusers ``StableDiffusionXLPipeline`` directory and an
h94/IP-Adapter directory (``sdxl_models/ip-adapter_sdxl.safetensors`` and ``sdxl_models/image_encoder/``)
at toy sizes, with random weights from a seed, and returns a
:class:`~stylear_core.curation.stylizer.StylizerConfig` that loads them. Nothing is downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from stylear_core.curation.stylizer import StylizerConfig


def write_tiny_clip_tokenizer_files(directory: Path, words: Sequence[str]) -> Path:
    """A byte-level CLIP BPE vocab (``vocab.json``, ``merges.txt``) with whole-word merges of ``words``."""
    from tokenizers.pre_tokenizers import ByteLevel

    directory.mkdir(parents=True, exist_ok=True)
    alphabet = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    for ch in alphabet:
        vocab[ch + "</w>"] = len(vocab)
    # Whole-word merges for the words of the synthetic prompts, so they tokenise to a few ids each
    # and fit the 77-token context.
    merges: list[tuple[str, str]] = []
    for word in sorted(set(words)):
        piece = word[0]
        for k, ch in enumerate(word[1:], start=2):
            right = ch + ("</w>" if k == len(word) else "")
            if (piece, right) not in merges:
                merges.append((piece, right))
                vocab.setdefault(piece + right, len(vocab))
            piece += right
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return directory


def _tiny_ip_adapter_state_dict(
    unet: Any, clip_embed_dim: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Random IP-Adapter (plain, 4 image tokens) weights in the released key layout for ``unet``.

    ``image_proj.{proj,norm}.*`` and ``ip_adapter.{k}.to_{k,v}_ip.weight`` with ``k`` = 1, 3, 5, ...
    over the cross-attention processors in ``unet.attn_processors`` order (as diffusers reads them).
    """

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) / shape[-1] ** 0.5

    cross = unet.config.cross_attention_dim
    sd = {
        "image_proj.proj.weight": rand(4 * cross, clip_embed_dim),
        "image_proj.proj.bias": torch.zeros(4 * cross),
        "image_proj.norm.weight": torch.ones(cross),
        "image_proj.norm.bias": torch.zeros(cross),
    }
    channels = unet.config.block_out_channels
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(channels))[int(name[len("up_blocks.")])]
        else:
            hidden = channels[int(name[len("down_blocks.")])]
        sd[f"ip_adapter.{key_id}.to_k_ip.weight"] = rand(hidden, cross)
        sd[f"ip_adapter.{key_id}.to_v_ip.weight"] = rand(hidden, cross)
        key_id += 2
    return sd


def prompt_words() -> list[str]:
    """The words of the synthetic dataset's prompts (object kinds, colours, places, sizes, joiners)."""
    from stylear_core.data import synthetic

    phrases = [*synthetic.OBJECT_KINDS, *synthetic.COLOURS, *synthetic.POSITIONS, *synthetic.SIZES]
    return sorted({w for phrase in phrases for w in phrase.split()} | {"a", "and", "at", "in", "the"})


def build_tiny_sdxl_stylizer_dir(path: str | Path, seed: int = 0) -> StylizerConfig:
    """Write a tiny random SDXL pipeline and IP-Adapter under ``path`` and return a config that loads them.

    Layout: ``<path>/sdxl/`` (``StableDiffusionXLPipeline.save_pretrained``) and
    ``<path>/ip_adapter/sdxl_models/{ip-adapter_sdxl.safetensors, image_encoder/}``. The UNet keeps
    SDXL's structure where InstantStyle needs it: ``addition_embed_type="text_time"``, two text
    encoders, and a first up block with three cross-attention transformers. The config samples
    2 steps at 64x64.
    """
    with torch.random.fork_rng(devices=[]):  # a seeded build that leaves the caller's random state alone
        torch.manual_seed(seed)
        return _write_tiny_sdxl_stylizer_dir(Path(path), seed)


def _write_tiny_sdxl_stylizer_dir(root: Path, seed: int) -> StylizerConfig:
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from safetensors.torch import save_file
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    text_hidden, text_proj, time_dim = 32, 32, 8
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,  # up blocks then hold 3 transformers each, as SDXL's
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + text_proj,  # 6 size/crop ids + pooled text
        cross_attention_dim=2 * text_hidden,  # both text encoders' hidden states, concatenated
        norm_num_groups=8,
    )
    vae = AutoencoderKL(  # four blocks: SDXL's downsampling factor 8, so 64 px is an 8x8 latent
        block_out_channels=(8, 16, 16, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    tokenizer_dir = write_tiny_clip_tokenizer_files(root / "tokenizer_files", prompt_words())
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), model_max_length=77)
    text_cfg = dict(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=text_proj,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(CLIPTextConfig(**text_cfg)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
    )
    pipe.save_pretrained(root / "sdxl")

    adapter_dir = root / "ip_adapter" / "sdxl_models"
    clip_embed_dim = 32
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=37,
            projection_dim=clip_embed_dim,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        )
    )
    image_encoder.save_pretrained(adapter_dir / "image_encoder")
    generator = torch.Generator().manual_seed(seed)
    save_file(
        _tiny_ip_adapter_state_dict(unet, clip_embed_dim, generator),
        adapter_dir / "ip-adapter_sdxl.safetensors",
    )

    return replace(
        StylizerConfig(),
        pipeline_path=str(root / "sdxl"),
        ip_adapter_path=str(root / "ip_adapter"),
        steps=2,
        height=64,
        width=64,
        device="cpu",
        dtype="float32",
    )


__all__ = ["build_tiny_sdxl_stylizer_dir", "prompt_words", "write_tiny_clip_tokenizer_files"]

"""Tiny random diffusion pipelines of the real architectures, for tests and the CPU demo.

Each builder saves a diffusers pipeline (``save_pretrained`` layout) at toy sizes: 64 px images as
8x8 latents, a few layers, random weights from a seed. Nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from dataclasses import replace
from pathlib import Path

import torch

from stylear_core.curation.stylizer import StylizerConfig
from stylear_core.testing.tiny_stylizer import (
    build_tiny_sdxl_stylizer_dir,
    prompt_words,
    write_tiny_clip_tokenizer_files,
)


def build_tiny_sdxl_dir(path: str | Path, seed: int = 0) -> Path:
    """Save a tiny random :class:`~diffusers.StableDiffusionXLPipeline` at ``path`` and return it.

    The pipeline is the curation stylizer's tiny SDXL (:func:`build_tiny_sdxl_stylizer_dir`: the real
    components at toy sizes, 64 px images as 8x8 latents), moved out of its stylizer layout.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}-") as tmp:
        built = Path(build_tiny_sdxl_stylizer_dir(tmp, seed=seed).pipeline_path)
        shutil.move(str(built), str(path))
    return path


def build_tiny_sd3_dir(path: str | Path, seed: int = 0) -> Path:
    """Save a tiny random :class:`~diffusers.StableDiffusion3Pipeline` at ``path`` and return it.

    A 2-layer MMDiT, an 8x VAE with SD3's shift and scale, two CLIP text encoders with projection
    and the stylizer's offline CLIP BPE tokenizer; no T5 (SD3 then feeds zeros in its place, as the
    pipeline allows). 64 px images give 8x8 latents.
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    path = Path(path)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = write_tiny_clip_tokenizer_files(Path(tmp), [*prompt_words(), "photo", "of"])
        tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), model_max_length=77)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=3,  # SD3 reads the penultimate layer
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,  # CLIP-L + CLIP-G hidden states, zero-padded to the T5 width
        caption_projection_dim=32,
        pooled_projection_dim=64,  # both pooled projections concatenated
        pos_embed_max_size=16,
    )
    vae = AutoencoderKL(  # four blocks: the real 8x downsampling; SD3's latent shift and scale
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=64,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=CLIPTextModelWithProjection(text_config),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(text_config),
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.save_pretrained(str(path))
    return path


TINY_SUPERVISOR_BUILDERS = {"sdxl": build_tiny_sdxl_dir, "sd3": build_tiny_sd3_dir}
"""Tiny random supervisor writers by preset name: ``builder(path, seed=0) -> path``."""


def tiny_stylizer_dir(cache_dir: str | Path, seed: int = 0) -> StylizerConfig:
    """The tiny random SDXL + IP-Adapter under ``cache_dir``, built on first use (into a temporary dir, then renamed).

    Returns a config whose paths point at it; later calls (and concurrent builders) reuse the first complete build.
    """
    root = Path(cache_dir) / f"tiny_sdxl_stylizer_seed{seed}"
    paths = {"pipeline_path": str(root / "sdxl"), "ip_adapter_path": str(root / "ip_adapter")}
    if not (root / "sdxl" / "model_index.json").is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = root.parent / f".{root.name}.{uuid.uuid4().hex[:8]}.tmp"
        build_tiny_sdxl_stylizer_dir(tmp, seed=seed)
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished first: keep its build
            shutil.rmtree(tmp, ignore_errors=True)
    return replace(StylizerConfig(), **paths)

"""Diffusion stylizer: SDXL + IP-Adapter in InstantStyle "style-only" mode, as a batch callable.

The stylizer turns (prompt, reference style image) into an image of the prompt's content in the
reference's style. InstantStyle (Wang et al. 2024, arXiv:2404.02733) feeds the IP-Adapter image
features only into the attention block that carries style in SDXL, ``up_blocks.0.attentions.1``::

    pipe.set_ip_adapter_scale({"up": {"block_0": [0.0, scale, 0.0]}})

so the reference's layout and objects do not leak into the result. Only the prompt and the
stylized image are kept downstream ("binary data"); the reference image is dropped.

Both models load from local directories only (never a hub id):

* ``pipeline_path``: a diffusers ``StableDiffusionXLPipeline`` directory (``model_index.json``, ...);
* ``ip_adapter_path``: the h94/IP-Adapter layout, ``<dir>/sdxl_models/ip-adapter_sdxl.safetensors`` and
  ``<dir>/sdxl_models/image_encoder/`` (a ``CLIPVisionModelWithProjection``).

:func:`build_tiny_sdxl_stylizer_dir` writes both, tiny and random, in exactly those layouts.
"""

from __future__ import annotations

import functools
import json
import logging
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from stylear_core.config import option
from stylear_core.data.batch_columns import column_values
from stylear_core.data.images import ImageDecodeError, decode_image, encode_png
from stylear_core.devices import resolve_device

log = logging.getLogger(__name__)

# InstantStyle's negative prompt for style transfer.
DEFAULT_NEGATIVE_PROMPT = (
    "text, watermark, lowres, low quality, worst quality, deformed, glitch, low contrast, noisy"
)


# What the stylizer returns per batch: the curated columns of a stylized row plus ``error``.
STYLIZER_OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("image", pa.binary()),
        pa.field("seed", pa.int64()),
        pa.field("style_ref", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("source", pa.string()),
        pa.field("error", pa.string()),
    ]
)


@dataclass
class StylizerConfig:
    """Where the SDXL pipeline and IP-Adapter live on disk, and how to sample."""

    pipeline_path: str = option("", "local StableDiffusionXLPipeline directory (diffusers layout)")
    pipeline_variant: str = option(
        "", "weights variant of the pipeline files, e.g. fp16; empty = default files"
    )
    ip_adapter_path: str = option("", "local IP-Adapter directory (h94/IP-Adapter layout)")
    ip_adapter_subfolder: str = option("sdxl_models", "subfolder of ip_adapter_path holding the weights")
    ip_adapter_weight_name: str = option("ip-adapter_sdxl.safetensors", "IP-Adapter weight file name")
    image_encoder_folder: str = option("image_encoder", "CLIP image encoder folder inside the subfolder")
    style_scale: float = option(1.0, "IP-Adapter scale on the style block (up_blocks.0.attentions.1)")
    layout_scale: float = option(
        0.0, "IP-Adapter scale on the layout block (down_blocks.2.attentions.1); 0 = InstantStyle style-only"
    )
    steps: int = option(30, "denoising steps")
    guidance_scale: float = option(5.0, "classifier-free guidance scale")
    height: int = option(1024, "output height in pixels")
    width: int = option(1024, "output width in pixels")
    negative_prompt: str = option(DEFAULT_NEGATIVE_PROMPT, "negative prompt for CFG")
    base_seed: int = option(0, "seed of a row that brings none: base_seed + crc32(id)")
    device: str = option("auto", "torch device; auto = cuda if available else cpu")
    dtype: str = option(
        "auto",
        "weights dtype; auto = float16 on cuda, float32 on cpu",
        choices=("auto", "float32", "float16", "bfloat16"),
    )


def instantstyle_scale(style_scale: float, layout_scale: float = 0.0) -> dict[str, Any]:
    """InstantStyle's per-block IP-Adapter scale: the style block (and the layout block if ``layout_scale``)."""
    scale: dict[str, Any] = {"up": {"block_0": [0.0, style_scale, 0.0]}}
    if layout_scale:
        scale["down"] = {"block_2": [0.0, layout_scale]}
    return scale


def row_seed(row_id: str, base_seed: int) -> int:
    """The seed of a row that brings none: stable per id, so a rerun redraws the same image."""
    return (base_seed + zlib.crc32(row_id.encode())) % 2**31


def _resolve_device_dtype(cfg: StylizerConfig) -> tuple[torch.device, torch.dtype]:
    device = resolve_device(cfg.device)
    if cfg.dtype == "auto":
        # Half precision on CPU is slow or unsupported for several kernels.
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, cfg.dtype)
    return device, dtype


@functools.cache
def per_row_style_pipeline_class() -> type:
    """A ``StableDiffusionXLPipeline`` taking one IP-Adapter reference per prompt, as precomputed embeddings.

    The stock pipeline repeats ``ip_adapter_image_embeds`` ``batch_size`` times (one reference
    shared by every prompt), and passing several images makes them joint references of every
    prompt. This subclass accepts embeddings already laid out per row, ``(2 * batch, 1, ...)``
    with classifier-free guidance (unconditional rows first, as the latents are) or
    ``(batch, 1, ...)`` without, and passes them through unchanged.
    """
    from diffusers import StableDiffusionXLPipeline

    class PerRowStyleSDXLPipeline(StableDiffusionXLPipeline):
        def prepare_ip_adapter_image_embeds(
            self,
            ip_adapter_image,
            ip_adapter_image_embeds,
            device,
            num_images_per_prompt,
            do_classifier_free_guidance,
        ):
            if ip_adapter_image_embeds is None:
                return super().prepare_ip_adapter_image_embeds(
                    ip_adapter_image,
                    ip_adapter_image_embeds,
                    device,
                    num_images_per_prompt,
                    do_classifier_free_guidance,
                )
            rows = num_images_per_prompt * (2 if do_classifier_free_guidance else 1)
            for embeds in ip_adapter_image_embeds:
                if embeds.shape[0] != rows:
                    raise ValueError(
                        f"per-row style embeddings have batch {embeds.shape[0]}, expected {rows}"
                    )
            return [embeds.to(device) for embeds in ip_adapter_image_embeds]

    return PerRowStyleSDXLPipeline


class Stylizer:
    """Batch callable (a Ray Data actor): ``{id, prompt, style_image[, seed, style_ref]}`` -> stylized rows.

    Built once per worker: loads the SDXL pipeline and the IP-Adapter from local paths and sets the
    InstantStyle block scales. ``__call__`` takes a batch as a dict of columns (numpy arrays or
    lists) and returns a table of :data:`STYLIZER_OUTPUT_SCHEMA`, one row per input row:

    ``id, prompt, image`` (PNG bytes, null on failure), ``seed``, ``style_ref`` (passed through),
    ``width, height`` (null on failure), ``source`` (``"stylized"``), ``error`` (null, or why the
    row failed). A bad row never raises. The columns are typed even when all null, so batches
    concatenate and write to parquet with one schema.
    """

    def __init__(self, cfg: StylizerConfig) -> None:
        if not cfg.pipeline_path or not cfg.ip_adapter_path:
            raise ValueError("StylizerConfig needs pipeline_path and ip_adapter_path (local directories)")
        self.cfg = cfg
        self.device, self.dtype = _resolve_device_dtype(cfg)
        pipe = per_row_style_pipeline_class().from_pretrained(
            cfg.pipeline_path, dtype=self.dtype, variant=cfg.pipeline_variant or None, local_files_only=True
        )
        pipe.load_ip_adapter(
            cfg.ip_adapter_path,
            subfolder=cfg.ip_adapter_subfolder,
            weight_name=cfg.ip_adapter_weight_name,
            image_encoder_folder=cfg.image_encoder_folder,
            local_files_only=True,
        )
        pipe.set_ip_adapter_scale(instantstyle_scale(cfg.style_scale, cfg.layout_scale))
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe

    @torch.inference_mode()
    def _style_embeds(self, styles: list[Image.Image], cfg_on: bool) -> list[torch.Tensor]:
        # Per-row references as (batch, 1, ...) embeddings, laid out for PerRowStyleSDXLPipeline.
        from diffusers.models.embeddings import ImageProjection

        embeds = []
        for layer in self.pipe.unet.encoder_hid_proj.image_projection_layers:
            hidden = not isinstance(layer, ImageProjection)
            cond, uncond = self.pipe.encode_image(styles, self.device, 1, hidden)
            cond, uncond = cond.unsqueeze(1), uncond.unsqueeze(1)
            embeds.append(torch.cat([uncond, cond]) if cfg_on else cond)
        return embeds

    @torch.inference_mode()
    def generate(
        self, prompts: Sequence[str], styles: Sequence[Image.Image], seeds: Sequence[int]
    ) -> list[Image.Image]:
        """Stylize ``prompts[i]`` after ``styles[i]`` with ``seeds[i]``: an image per prompt; raises on failure."""
        cfg = self.cfg
        cfg_on = cfg.guidance_scale > 1.0
        generators = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]
        out = self.pipe(
            prompt=list(prompts),
            negative_prompt=[cfg.negative_prompt] * len(prompts) if cfg_on else None,
            ip_adapter_image_embeds=self._style_embeds(list(styles), cfg_on),
            num_inference_steps=cfg.steps,
            guidance_scale=cfg.guidance_scale,
            height=cfg.height,
            width=cfg.width,
            generator=generators,
            output_type="pil",
        )
        return list(out.images)

    def __call__(self, batch: Mapping[str, Any] | pa.Table) -> pa.Table:
        """Stylize a batch (dict of columns or a pyarrow table); see the class docstring for the columns."""
        ids = [str(i) for i in column_values(batch["id"])]
        prompts = column_values(batch["prompt"])
        style_bytes = column_values(batch["style_image"])
        n = len(ids)
        columns = batch.column_names if isinstance(batch, pa.Table) else batch
        seeds_in = column_values(batch["seed"]) if "seed" in columns else [None] * n
        style_refs = column_values(batch["style_ref"]) if "style_ref" in columns else [None] * n
        seeds = [
            int(s)
            if s is not None and not (isinstance(s, float) and np.isnan(s))
            else row_seed(i, self.cfg.base_seed)
            for i, s in zip(ids, seeds_in)
        ]
        images: list[bytes | None] = [None] * n
        errors: list[str | None] = [None] * n

        valid, styles = [], []
        for k in range(n):
            if not isinstance(prompts[k], str) or not prompts[k].strip():
                errors[k] = "empty prompt"
                continue
            try:
                styles.append(decode_image(bytes(style_bytes[k] or b"")))
            except ImageDecodeError as e:
                errors[k] = f"style image: {e}"
                continue
            valid.append(k)

        if valid:
            try:
                results = self.generate([prompts[k] for k in valid], styles, [seeds[k] for k in valid])
                for k, img in zip(valid, results):
                    images[k] = encode_png(img)
            except Exception as batch_error:  # any failure: isolate the failing rows, keep the rest
                log.warning("stylizer batch of %d failed (%s); retrying row by row", len(valid), batch_error)
                for k, style in zip(valid, styles):
                    try:
                        images[k] = encode_png(self.generate([prompts[k]], [style], [seeds[k]])[0])
                    except Exception as e:
                        errors[k] = f"generation: {type(e).__name__}: {e}"

        ok = [img is not None for img in images]
        return pa.table(
            {
                "id": ids,
                "prompt": [str(p) if p is not None else "" for p in prompts],
                "image": images,
                "seed": seeds,
                "style_ref": [str(r) if r is not None else None for r in style_refs],
                "width": [self.cfg.width if good else None for good in ok],
                "height": [self.cfg.height if good else None for good in ok],
                "source": ["stylized"] * n,
                "error": errors,
            },
            schema=STYLIZER_OUTPUT_SCHEMA,
        )


# ---------------------------------------------------------------------------------------------
# A tiny random SDXL + IP-Adapter, saved in the real on-disk layouts.


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

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

:func:`stylear_core.testing.tiny_stylizer.build_tiny_sdxl_stylizer_dir` writes both, tiny and random, in
exactly those layouts.
"""

from __future__ import annotations

import functools
import logging
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from stylear_core.config import option
from stylear_core.data.batch_columns import batch_values, column_values
from stylear_core.data.images import ImageDecodeError, decode_image, encode_png
from stylear_core.data.schemas import STYLIZER_OUTPUT_SCHEMA
from stylear_core.devices import resolve_device

log = logging.getLogger(__name__)

# InstantStyle's negative prompt for style transfer.
DEFAULT_NEGATIVE_PROMPT = (
    "text, watermark, lowres, low quality, worst quality, deformed, glitch, low contrast, noisy"
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
        seeds_in = batch_values(batch, "seed", n)
        style_refs = batch_values(batch, "style_ref", n)
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

"""Diffusion supervisor families for DreamBooth LoRA: how to load, condition, noise and save SDXL and SD3.

A :class:`SupervisorFamily` says, for one diffusers pipeline kind, which module gets the LoRA, how
prompts are encoded (frozen text encoders), how latents are scaled, which denoising loss training
uses (SDXL: epsilon / v prediction at DDPM timesteps with size/crop micro-conditioning; SD3:
rectified-flow matching with logit-normal timestep density) and how the LoRA is saved
(``save_lora_weights``, read back by ``pipe.load_lora_weights``). :func:`load_supervisor` opens a
local diffusers directory (``save_pretrained`` layout); weights are never downloaded.
"""

from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from stylear_core.proxy.dreambooth import DreamBoothConfig

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default name, found by load_lora_weights
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class SupervisorFamily:
    """One diffusers pipeline kind as a DreamBooth-LoRA supervisor (see :data:`SUPERVISOR_FAMILIES`)."""

    name: str = ""
    denoiser_attr: str = ""
    default_target_modules: tuple[str, ...] = ()

    def pipeline_class(self) -> type:
        """The diffusers pipeline class."""
        raise NotImplementedError

    def denoiser(self, pipe: Any) -> torch.nn.Module:
        """The module that gets the LoRA (UNet or transformer)."""
        return getattr(pipe, self.denoiser_attr)

    def encode_prompts(self, pipe: Any, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Frozen text conditioning for ``prompts``: ``prompt_embeds`` (B, L, D) and ``pooled`` (B, P)."""
        raise NotImplementedError

    def scale_latents(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents -> the denoiser's latent space (the pipeline VAE's shift and scaling factor)."""
        raise NotImplementedError

    def per_sample_loss(
        self,
        pipe: Any,
        scheduler: Any,
        latents: torch.Tensor,
        cond: dict[str, torch.Tensor],
        generator: torch.Generator,
        cfg: DreamBoothConfig,
    ) -> torch.Tensor:
        """The denoising loss of each latent, ``(B,)``, at noise and timesteps drawn from ``generator``."""
        raise NotImplementedError

    def training_scheduler(self, pipe: Any) -> Any:
        """The noise schedule training samples from, built from the pipeline's scheduler config."""
        raise NotImplementedError

    def save_lora(self, pipe: Any, directory: Path) -> None:
        """Write the denoiser's LoRA with the pipeline class's ``save_lora_weights``."""
        raise NotImplementedError


@torch.no_grad()
def encode_posteriors(vae: Any, pixels: torch.Tensor, chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior of each image: ``(mean, std)``, each ``(B, C, h, w)`` float32 on the VAE's device.

    Training images are fixed (their crop and flip are drawn once), so their posteriors are computed
    once and latents are drawn from them each step, as diffusers' ``--cache_latents`` does. The VAE
    runs in float32: SDXL's VAE overflows in float16 (its config sets ``force_upcast``).
    """
    dtype = vae.dtype
    if dtype != torch.float32:
        vae.to(torch.float32)
    try:
        means, stds = [], []
        for start in range(0, pixels.shape[0], chunk):
            dist = vae.encode(pixels[start : start + chunk].to(vae.device, torch.float32)).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
        return torch.cat(means), torch.cat(stds)
    finally:
        if dtype != torch.float32:
            vae.to(dtype)


def randn_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise shaped like ``x`` (its device and dtype), drawn from ``generator``."""
    # Drawn on the CPU generator and moved, so a seed gives the same noise on any device.
    return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)


class SdxlFamily(SupervisorFamily):
    """Stable Diffusion XL: UNet with ``text_time`` conditioning, two CLIP text encoders, DDPM objective."""

    name = "sdxl"
    denoiser_attr = "unet"
    default_target_modules = ("to_k", "to_q", "to_v", "to_out.0")

    def pipeline_class(self) -> type:
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    def encode_prompts(self, pipe: Any, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        return {"prompt_embeds": embeds, "pooled": pooled}

    def scale_latents(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        return latents * pipe.vae.config.scaling_factor

    def training_scheduler(self, pipe: Any) -> Any:
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(pipe.scheduler.config)

    def per_sample_loss(self, pipe, scheduler, latents, cond, generator, cfg):
        unet = pipe.unet
        noise = randn_like(latents, generator)
        steps = scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator).to(latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        pred = unet(
            noisy.to(unet.dtype),
            timesteps,
            cond["prompt_embeds"].to(unet.dtype),
            added_cond_kwargs={"time_ids": cond["time_ids"], "text_embeds": cond["pooled"].to(unet.dtype)},
            return_dict=False,
        )[0]
        if scheduler.config.prediction_type == "epsilon":
            target = noise
        elif scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"unsupported prediction type {scheduler.config.prediction_type!r}")
        return F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)

    def save_lora(self, pipe: Any, directory: Path) -> None:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
        self.pipeline_class().save_lora_weights(
            directory,
            unet_lora_layers=layers,
            unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
            weight_name=LORA_WEIGHT_NAME,
        )


class Sd3Family(SupervisorFamily):
    """Stable Diffusion 3: MMDiT transformer, CLIP-L/G (+ optional T5) text encoders, flow matching."""

    name = "sd3"
    denoiser_attr = "transformer"
    default_target_modules = (
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "attn.to_k",
        "attn.to_out.0",
        "attn.to_q",
        "attn.to_v",
    )

    def pipeline_class(self) -> type:
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline

    def encode_prompts(self, pipe: Any, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompt=prompts,
                prompt_2=None,
                prompt_3=None,
                device=device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
            )
        return {"prompt_embeds": embeds, "pooled": pooled}

    def scale_latents(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        cfg = pipe.vae.config
        return (latents - (cfg.shift_factor or 0.0)) * cfg.scaling_factor

    def training_scheduler(self, pipe: Any) -> Any:
        return copy.deepcopy(pipe.scheduler)

    def per_sample_loss(self, pipe, scheduler, latents, cond, generator, cfg):
        from diffusers.training_utils import (
            compute_density_for_timestep_sampling,
            compute_loss_weighting_for_sd3,
        )

        transformer = pipe.transformer
        noise = randn_like(latents, generator)
        u = compute_density_for_timestep_sampling(
            cfg.weighting_scheme,
            latents.shape[0],
            logit_mean=cfg.logit_mean,
            logit_std=cfg.logit_std,
            mode_scale=cfg.mode_scale,
            generator=generator,
        )
        indices = (u * scheduler.config.num_train_timesteps).long().clamp(max=len(scheduler.timesteps) - 1)
        timesteps = scheduler.timesteps[indices].to(latents.device)
        sigmas = scheduler.sigmas[indices].to(latents.device, latents.dtype).view(-1, 1, 1, 1)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        pred = transformer(
            hidden_states=noisy.to(transformer.dtype),
            timestep=timesteps,
            encoder_hidden_states=cond["prompt_embeds"].to(transformer.dtype),
            pooled_projections=cond["pooled"].to(transformer.dtype),
            return_dict=False,
        )[0].float()
        if cfg.precondition_outputs:
            pred = pred * (-sigmas) + noisy
            target = latents
        else:
            target = noise - latents
        weighting = compute_loss_weighting_for_sd3(cfg.weighting_scheme, sigmas).float()
        return (weighting * (pred - target.float()) ** 2).flatten(1).mean(1)

    def save_lora(self, pipe: Any, directory: Path) -> None:
        from peft.utils import get_peft_model_state_dict

        self.pipeline_class().save_lora_weights(
            directory,
            transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
            transformer_lora_adapter_metadata=pipe.transformer.peft_config["default"].to_dict(),
            weight_name=LORA_WEIGHT_NAME,
        )


SUPERVISOR_FAMILIES: dict[str, SupervisorFamily] = {"sdxl": SdxlFamily(), "sd3": Sd3Family()}
"""Supervisor presets by name."""


def supervisor_family(preset: str) -> SupervisorFamily:
    """The :class:`SupervisorFamily` of ``preset`` ("sdxl" or "sd3")."""
    if preset not in SUPERVISOR_FAMILIES:
        raise ValueError(f"unknown supervisor preset {preset!r} (known: {sorted(SUPERVISOR_FAMILIES)})")
    return SUPERVISOR_FAMILIES[preset]


def load_supervisor(
    preset: str,
    pretrained_dir: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    lora_dir: str | Path | None = None,
) -> Any:
    """The ``preset`` pipeline from the local diffusers directory ``pretrained_dir``, on ``device``.

    ``lora_dir`` (a :func:`run_dreambooth_subject` output) is loaded with ``load_lora_weights``.
    Raises :class:`FileNotFoundError` when the directory is not a saved pipeline (nothing is downloaded).
    """
    pipeline_class = supervisor_family(preset).pipeline_class()
    path = Path(pretrained_dir).expanduser()
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"supervisor directory {path} has no model_index.json: pass a local diffusers pipeline "
            f"directory (save_pretrained layout); weights are never downloaded"
        )
    # A required component saved as absent (SD3 without its T5 encoder) must be passed as None.
    index = json.loads((path / "model_index.json").read_text())
    required = [
        name
        for name, p in inspect.signature(pipeline_class.__init__).parameters.items()
        if name != "self" and p.default is inspect.Parameter.empty
    ]
    absent = {k: None for k in required if not isinstance(index.get(k), list) or index[k][0] is None}
    pipe = pipeline_class.from_pretrained(str(path), dtype=dtype, local_files_only=True, **absent)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    if lora_dir is not None:
        pipe.load_lora_weights(str(lora_dir), weight_name=LORA_WEIGHT_NAME)
    return pipe

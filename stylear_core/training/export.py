"""The serving artefact of a training run: LoRA + resampler as safetensors, a probe, and a manifest.

``<output_dir>/adapter/`` holds::

    adapter_model.safetensors, adapter_config.json   the backbone's LoRA in peft's format (save_lora)
    resampler.safetensors                             the resampler's own state dict (image_proj layout)
    backbone.safetensors                              full fine-tuning only: every backbone weight
    probe.safetensors                                 one training row and the trained model's logits
                                                      on it (noise 0), to check a reload is exact
    manifest.json                                     format stylear.adapter/1: base model, preset,
                                                      step, metrics, the model config block

:func:`load_adapter` puts an artefact onto a freshly built base model; :func:`verify_adapter` reruns the
probe and returns the largest logit difference. Under ZeRO-3 the trainable parameters are sharded:
:func:`export_adapter` gathers them (a collective: every rank calls it) and rank 0 writes.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from stylear_core.models.lora import DEFAULT_ADAPTER, describe_adapter, has_lora, load_lora, save_lora
from stylear_core.models.resampler import load_image_proj
from stylear_core.models.stylear import StyleARModel, image_token_log_probs, sequence_labels
from stylear_core.runs import write_manifest

ADAPTER_FORMAT = "stylear.adapter/1"
ADAPTER_DIRNAME = "adapter"
RESAMPLER_WEIGHTS_NAME = "resampler.safetensors"
BACKBONE_WEIGHTS_NAME = "backbone.safetensors"
PROBE_NAME = "probe.safetensors"
PROBE_MAX_POSITIONS = 64  # logits kept per probe: enough to pin the model down, small at vocab 65536


@contextmanager
def gathered_parameters(params: list[nn.Parameter]) -> Iterator[None]:
    """Inside the block ZeRO-3-partitioned ``params`` hold their full values (a collective: every rank
    must enter it); a no-op for parameters DeepSpeed does not partition (ZeRO-2, plain modules)."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def _cpu_state(named: Iterator[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in named}


def export_adapter(
    model: StyleARModel,
    directory: str | Path,
    rank: int = 0,
    adapter_name: str = DEFAULT_ADAPTER,
    full_backbone: bool = False,
) -> Path | None:
    """Write ``model``'s trained parts into ``directory`` (rank 0); every rank must call it under ZeRO-3.

    Writes the LoRA adapter ``adapter_name`` (when the backbone has one), the resampler and, with
    ``full_backbone``, every backbone weight (gathered one tensor at a time to bound memory). Returns
    the directory on rank 0, None elsewhere.
    """
    directory = Path(directory)
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
    if has_lora(model.backbone, adapter_name):
        lora = [p for n, p in model.backbone.named_parameters() if ".lora_" in n and f".{adapter_name}." in n]
        with gathered_parameters(lora):
            if rank == 0:
                save_lora(model.backbone, directory, adapter_name)
    with gathered_parameters(list(model.resampler.parameters())):
        if rank == 0:
            save_file(
                _cpu_state(model.resampler.state_dict().items()), str(directory / RESAMPLER_WEIGHTS_NAME)
            )
    if full_backbone:
        state: dict[str, torch.Tensor] = {}
        for name, param in model.backbone.named_parameters():
            with gathered_parameters([param]):
                if rank == 0:
                    state[name] = param.detach().to("cpu").contiguous().clone()
        if rank == 0:
            save_file(state, str(directory / BACKBONE_WEIGHTS_NAME))
    return directory if rank == 0 else None


def load_adapter(
    model: StyleARModel, directory: str | Path, adapter_name: str = DEFAULT_ADAPTER
) -> StyleARModel:
    """Load an artefact written by :func:`export_adapter` into ``model`` (built from the same model
    config: same base weights, LoRA rank and resampler sizes); returns ``model``."""
    directory = Path(directory)
    if not (directory / RESAMPLER_WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{directory}: no {RESAMPLER_WEIGHTS_NAME}; not a stylear adapter directory")
    if (directory / BACKBONE_WEIGHTS_NAME).is_file():
        state = load_file(str(directory / BACKBONE_WEIGHTS_NAME))
        missing, unexpected = model.backbone.load_state_dict(state, strict=False)
        if unexpected:
            raise ValueError(f"{directory / BACKBONE_WEIGHTS_NAME}: unexpected key {unexpected[0]!r}")
    if (directory / "adapter_model.safetensors").is_file():
        load_lora(model.backbone, directory, adapter_name)
    load_image_proj(directory / RESAMPLER_WEIGHTS_NAME, model.resampler)
    return model


def probe_style_tokens(model: StyleARModel, style_features: torch.Tensor) -> torch.Tensor:
    """Noise-free style tokens of probe features; features with no tokens (``(B, 0, width)``) stand for
    a prompt without style tokens and give ``(B, 0, hidden)``."""
    if style_features.shape[1] == 0:
        param = next(model.backbone.parameters())
        hidden = model.backbone.config.hidden_size
        return torch.zeros(style_features.shape[0], 0, hidden, device=param.device, dtype=param.dtype)
    return model.style_tokens(style_features=style_features, noise_strength=0.0)


def probe_outputs(model: nn.Module, probe: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run a probe through a StyleAR model (or a module whose ``forward(method="logits", ...)`` does):
    ``{"logits": row 0's logits at the probe's positions (P, V), "log_probs": per-row summed
    image-token log-probs (B,)}``, style noise 0."""
    kwargs = {k: probe[k] for k in ("prompt_ids", "prompt_mask", "image_tokens", "image_mask")}
    with torch.no_grad():
        if isinstance(model, StyleARModel):
            tokens = probe_style_tokens(model, probe["style_features"])
            logits = model.sequence_logits(style_tokens=tokens, **kwargs)
        else:
            logits = model(method="logits", style_features=probe["style_features"], **kwargs)
    labels = sequence_labels(probe["prompt_ids"].shape[1], probe["image_tokens"], probe["image_mask"])
    positions = probe["positions"].to(logits.device)
    return {
        "logits": logits[0, positions].float().cpu(),
        "log_probs": image_token_log_probs(logits, labels).float().cpu(),
    }


def make_probe(
    batch: dict[str, torch.Tensor], style_features: torch.Tensor, rows: int = 2
) -> dict[str, torch.Tensor]:
    """The probe inputs from a collated training batch: its first ``rows`` rows, their style features
    (``(B, 0, width)`` for prompts without style tokens), and the logit positions to keep (the positions predicting row 0's image tokens, at most 64)."""
    probe = {
        k: batch[k][:rows].detach().cpu() for k in ("prompt_ids", "prompt_mask", "image_tokens", "image_mask")
    }
    probe["style_features"] = style_features[:rows].detach().float().cpu()
    start = probe["prompt_ids"].shape[1] - 1
    count = int(probe["image_mask"][0].sum())
    positions = torch.arange(start, start + count)
    if len(positions) > PROBE_MAX_POSITIONS:
        positions = positions[torch.linspace(0, len(positions) - 1, PROBE_MAX_POSITIONS).long()]
    probe["positions"] = positions
    return probe


def write_probe(
    directory: str | Path, probe: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]
) -> Path:
    """Save probe inputs and the expected outputs as ``probe.safetensors`` in ``directory``."""
    tensors = {**{f"input.{k}": v.contiguous() for k, v in probe.items()}}
    tensors.update({f"expected.{k}": v.contiguous() for k, v in outputs.items()})
    path = Path(directory) / PROBE_NAME
    save_file(tensors, str(path))
    return path


def verify_adapter(model: StyleARModel, directory: str | Path) -> float:
    """Rerun the artefact's probe on ``model`` (with the adapter loaded); the largest absolute
    difference to the logits and log-probs recorded at export time."""
    tensors = load_file(str(Path(directory) / PROBE_NAME))
    device = next(model.backbone.parameters()).device
    probe = {k.removeprefix("input."): v.to(device) for k, v in tensors.items() if k.startswith("input.")}
    probe["style_features"] = probe["style_features"].to(next(model.resampler.parameters()).dtype)
    got = probe_outputs(model, probe)
    return max(float((got[k] - tensors[f"expected.{k}"]).abs().max()) for k in ("logits", "log_probs"))


def finalize_export(checkpoint_dir: str | Path, output_dir: str | Path, **manifest: Any) -> Path:
    """Copy the ``adapter/`` of a final training checkpoint to ``<output_dir>/adapter`` and write its
    manifest (format ``stylear.adapter/1``, ``status: complete``, plus ``manifest`` fields such as
    ``base_model``, ``preset``, ``step``, ``metrics``). Returns the adapter directory."""
    source = Path(checkpoint_dir) / ADAPTER_DIRNAME
    if not (source / RESAMPLER_WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{checkpoint_dir}: the checkpoint holds no exported adapter")
    target = Path(output_dir) / ADAPTER_DIRNAME
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    lora = None
    if (target / "adapter_config.json").is_file():
        described = describe_adapter(target)
        lora = {k: described.get(k) for k in ("r", "lora_alpha", "lora_dropout", "target_modules")}
    files = sorted(p.name for p in target.iterdir() if p.is_file())
    write_manifest(target, ADAPTER_FORMAT, status="complete", lora=lora, files=files, **manifest)
    return target


def base_model_id(model_cfg: Any) -> str:
    """What the adapter applies to: the backbone checkpoint path, or ``random:<preset>:seed<seed>``."""
    return model_cfg.backbone_path or f"random:{model_cfg.preset}:seed{model_cfg.seed}"


def export_training_outcome(
    checkpoint: Any, output_dir: str | Path, model_cfg: Any, metrics: dict[str, Any], **manifest: Any
) -> Path:
    """Driver side: copy the adapter out of the final ``ray.train.Checkpoint`` into ``<output_dir>/adapter``
    with a manifest naming the base model, preset, step, metrics (digests apart) and the model block."""
    from stylear_core.config import to_dict

    if checkpoint is None:
        raise RuntimeError("the training run left no checkpoint to export")
    scalars = {
        k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not k.startswith("digest/")
    }
    digests = {k.removeprefix("digest/"): v for k, v in metrics.items() if k.startswith("digest/")}
    with checkpoint.as_directory() as directory:
        return finalize_export(
            directory,
            output_dir,
            base_model=base_model_id(model_cfg),
            preset=model_cfg.preset,
            step=int(metrics.get("step", 0)),
            metrics=scalars,
            digests=digests,
            model_config=to_dict(model_cfg),
            **manifest,
        )

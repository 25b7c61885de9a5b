"""The adapter artefact's layout: file names, manifest format, the name rule, and the adapter errors.

An adapter is a directory (``<output_dir>/adapter`` of a training run, ``<adapters_root>/<name>`` once
published)::

    manifest.json                  format stylear.adapter/1: kind (style | subject), subjects, base model,
                                   preset, step, metrics, the model config block, lora (r, lora_alpha, ...)
    adapter_model.safetensors      the backbone's LoRA in peft's format (+ adapter_config.json: r, lora_alpha)
      (or lora.safetensors, same keys; or StyleAR's release model.safetensors)
    resampler.safetensors          optional: the adapter's own resampler (or the release's image_proj.pth)
    backbone.safetensors           full fine-tuning only: every backbone weight (not servable by the slot)
    probe.safetensors              one training batch and the trained model's outputs on it

Torch-free: the HTTP layer checks adapter names against :data:`ADAPTER_NAME_PATTERN` without the model stack.
"""

from __future__ import annotations

import re
from typing import Any

ADAPTER_FORMAT = "stylear.adapter/1"
ADAPTER_DIRNAME = "adapter"
RESAMPLER_WEIGHTS_NAME = "resampler.safetensors"
RESAMPLER_NAME = RESAMPLER_WEIGHTS_NAME
BACKBONE_WEIGHTS_NAME = "backbone.safetensors"
PROBE_NAME = "probe.safetensors"
PLAIN_LORA_NAME = "lora.safetensors"

# A served adapter's name is one path component under the adapters root.
ADAPTER_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class AdapterError(ValueError):
    """An adapter cannot be used (bad name, bad files, does not fit the model); the message says why."""


class AdapterNotFoundError(AdapterError, LookupError):
    """No adapter of that name under the adapters root."""


def check_adapter_name(name: str) -> str:
    """``name`` if it is a plain directory name (letters, digits, ``._-``; no paths), else :class:`AdapterError`."""
    if not isinstance(name, str) or not ADAPTER_NAME_PATTERN.match(name):
        raise AdapterError(f"adapter name {name!r} must be 1-64 of letters, digits, '.', '_' or '-'")
    return name


def base_model_id(model_cfg: Any) -> str:
    """What the adapter applies to: the backbone checkpoint path, or ``random:<preset>:seed<seed>``."""
    return model_cfg.backbone_path or f"random:{model_cfg.preset}:seed{model_cfg.seed}"


def adapter_model_config(adapter_dir: Any, model: Any = None) -> Any:
    """``model`` when given, else the model block (a ``ModelConfig``) the adapter's manifest records.

    Raises :class:`AdapterError` when ``adapter_dir`` holds no manifest with a model block.
    """
    if model is not None:
        return model
    from stylear_core.config import from_dict
    from stylear_core.models.config import ModelConfig
    from stylear_core.runs import read_manifest

    manifest = read_manifest(adapter_dir) or {}
    if "model_config" not in manifest:
        raise AdapterError(f"{adapter_dir}: no adapter manifest with a model_config block")
    return from_dict(ModelConfig, manifest["model_config"])

"""LoRA on the Lumina backbone through peft, in StyleAR's layout, and StyleAR's released weights.

StyleAR adapts q/k/v/o of every attention layer, every MLP ``down_proj`` and the ``lm_head`` with
rank-4 LoRA. :func:`add_lora` injects peft LoRA layers in place (the backbone object keeps its type
and forward; base weights are frozen). Adapters are saved and loaded in peft's own format
(``adapter_model.safetensors`` + ``adapter_config.json``, keys ``base_model.model.<module>.lora_{A,B}.weight``),
so ``peft.PeftModel.from_pretrained`` reads them too.

StyleAR's release (``model.safetensors`` + ``image_proj.pth``) stores each factor pair as
``<module>_lora.{A,B}`` with ``A (in, r)``, ``B (r, out)`` applied as ``x @ A @ B`` without scaling:
that is peft's ``lora_A.weight = A.T``, ``lora_B.weight = B.T`` with ``lora_alpha = r``
(:func:`convert_release_lora`). Keys of the release file that are not LoRA factors are ignored and
reported, as the release's own loader copies its list of factor keys and ignores the rest.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from torch import nn

from stylear_core.models.resampler import StyleResampler, load_image_proj

logger = logging.getLogger(__name__)

LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj", "lm_head")
"""StyleAR's LoRA targets: attention projections of every layer, the MLP down-projection, the LM head."""

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
PEFT_KEY_PREFIX = "base_model.model."  # how a PeftModel names the wrapped model's modules on disk
DEFAULT_ADAPTER = "default"

RELEASE_LORA_NAME = "model.safetensors"
RELEASE_IMAGE_PROJ_NAME = "image_proj.pth"
_RELEASE_KEY = re.compile(
    r"^(?P<module>model\.layers\.\d+\.self_attn\.[qkvo]_proj|model\.layers\.\d+\.mlp\.down_proj|lm_head)"
    r"(?:_lora|\.lm_head_lora)\.(?P<factor>[AB])$"
)


class LoraLoadError(ValueError):
    """LoRA weights do not fit the model; the message names the offending key."""


def stylear_lora_config(rank: int = 4, alpha: float = 4.0, dropout: float = 0.0) -> LoraConfig:
    """peft ``LoraConfig`` on :data:`LORA_TARGET_MODULES` with the given rank, alpha and dropout."""
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(LORA_TARGET_MODULES),
        bias="none",
    )


def add_lora(
    backbone: nn.Module,
    rank: int = 4,
    alpha: float = 4.0,
    dropout: float = 0.0,
    adapter_name: str = DEFAULT_ADAPTER,
    config: LoraConfig | None = None,
) -> nn.Module:
    """Inject LoRA layers into ``backbone`` in place and freeze everything but the LoRA factors.

    Returns ``backbone`` (same object, same forward). LoRA ``B`` starts at zero, so the output is
    unchanged until training. Another ``adapter_name`` adds a second adapter beside the first.
    """
    config = config or stylear_lora_config(rank, alpha, dropout)
    inject_adapter_in_model(config, backbone, adapter_name=adapter_name)
    # New LoRA submodules (their dropout) start in train mode; keep the backbone's current mode.
    backbone.train(backbone.training)
    for name, param in backbone.named_parameters():
        param.requires_grad_(".lora_" in name and f".{adapter_name}." in name)
    return backbone


def has_lora(model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> bool:
    """Whether ``model`` holds peft LoRA layers for ``adapter_name``."""
    return any(
        isinstance(m, BaseTunerLayer) and adapter_name in getattr(m, "lora_A", {}) for m in model.modules()
    )


def adapter_config(model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> LoraConfig:
    """The ``LoraConfig`` peft recorded on ``model`` for ``adapter_name`` when it was injected."""
    config = getattr(model, "peft_config", {}).get(adapter_name)
    if config is None:
        raise LoraLoadError(f"model has no LoRA adapter {adapter_name!r}")
    return config


def lora_parameters(model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> list[nn.Parameter]:
    """The LoRA factor parameters of ``adapter_name``."""
    return [p for n, p in model.named_parameters() if ".lora_" in n and f".{adapter_name}." in n]


def lora_state_dict(model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
    """The adapter's factors keyed ``<module>.lora_{A,B}.weight`` (peft's names, no adapter name)."""
    return get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)


def set_lora_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], adapter_name: str = DEFAULT_ADAPTER
) -> None:
    """Load ``<module>.lora_{A,B}.weight`` factors into the adapter; every key and shape must match.

    Raises :class:`LoraLoadError` naming the first unexpected, missing or mis-shaped key.
    """
    expected = lora_state_dict(model, adapter_name)
    for key, tensor in state_dict.items():
        if key not in expected:
            raise LoraLoadError(f"unexpected LoRA key {key!r} (no such LoRA layer in the model)")
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise LoraLoadError(
                f"{key}: checkpoint shape {tuple(tensor.shape)}, model expects {tuple(expected[key].shape)}"
            )
    missing = sorted(set(expected) - set(state_dict))
    if missing:
        raise LoraLoadError(f"missing LoRA key {missing[0]!r} ({len(missing)} missing)")
    set_peft_model_state_dict(model, dict(state_dict), adapter_name=adapter_name)


def save_lora(model: nn.Module, directory: str | Path, adapter_name: str = DEFAULT_ADAPTER) -> Path:
    """Write the adapter as a peft adapter dir (``adapter_model.safetensors`` + ``adapter_config.json``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        PEFT_KEY_PREFIX + k: v.detach().cpu().contiguous()
        for k, v in lora_state_dict(model, adapter_name).items()
    }
    save_file(tensors, str(directory / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    adapter_config(model, adapter_name).save_pretrained(str(directory))
    return directory


def read_lora_config(directory: str | Path) -> LoraConfig:
    """The ``LoraConfig`` stored in a peft adapter dir."""
    return LoraConfig.from_pretrained(str(directory))


def load_lora(model: nn.Module, directory: str | Path, adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Load a peft adapter dir written by :func:`save_lora` (or peft) into ``model``.

    Adds the adapter with the dir's config first if the model does not hold it yet; returns ``model``.
    """
    directory = Path(directory)
    weights = directory / ADAPTER_WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{directory}: no {ADAPTER_WEIGHTS_NAME}")
    if not has_lora(model, adapter_name):
        add_lora(model, adapter_name=adapter_name, config=read_lora_config(directory))
    tensors = load_file(str(weights))
    state = {k.removeprefix(PEFT_KEY_PREFIX): v for k, v in tensors.items()}
    set_lora_state_dict(model, state, adapter_name)
    return model


@contextmanager
def adapters_disabled(model: nn.Module):
    """Run ``model`` as its base weights (all LoRA layers bypassed) inside the block, e.g. a DPO reference."""
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    previous = [m.disable_adapters for m in layers]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m, was_disabled in zip(layers, previous):
            m.enable_adapters(not was_disabled)


@dataclass(frozen=True)
class ReleaseLora:
    """StyleAR release factors in peft's layout: ``state_dict``, its ``rank``, and the file's ignored keys."""

    state_dict: dict[str, torch.Tensor]
    rank: int
    ignored_keys: tuple[str, ...] = ()


def read_release_lora(state_dict: Mapping[str, torch.Tensor]) -> ReleaseLora:
    """StyleAR release factors -> :class:`ReleaseLora` (peft ``<module>.lora_{A,B}.weight``, rank, ignored keys).

    ``<m>_lora.A`` ``(in, r)`` becomes ``<m>.lora_A.weight = A.T`` and ``<m>_lora.B`` ``(r, out)``
    becomes ``<m>.lora_B.weight = B.T``; load them with ``lora_alpha = r`` (scaling 1), as the
    release applies ``x @ A @ B`` unscaled. Keys that are not a release LoRA factor of a target
    module are left out, listed in ``ignored_keys`` and logged (the release's loader ignores them
    too). Raises :class:`LoraLoadError` naming a factor that is not 2-D, a module missing one
    factor, an inconsistent rank, or a file with no factors at all.
    """
    out: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    ignored: list[str] = []
    for key, tensor in state_dict.items():
        match = _RELEASE_KEY.match(key)
        if match is None:
            ignored.append(key)
            continue
        module, factor = match["module"], match["factor"]
        if tensor.ndim != 2:
            raise LoraLoadError(f"{key}: expected a 2-D factor, got shape {tuple(tensor.shape)}")
        ranks[key] = tensor.shape[1] if factor == "A" else tensor.shape[0]
        out[f"{module}.lora_{factor}.weight"] = tensor.t().contiguous()
    for key in out:
        other = key.replace("lora_A", "lora_B") if ".lora_A." in key else key.replace("lora_B", "lora_A")
        if other not in out:
            raise LoraLoadError(f"{other!r} is missing: every release LoRA module needs both A and B")
    if not ranks:
        raise LoraLoadError(
            f"the StyleAR LoRA file holds no factors (<module>_lora.A/B); its {len(ignored)} key(s) "
            f"start {ignored[:3]}"
        )
    if len(set(ranks.values())) != 1:
        key = next(k for k, r in ranks.items() if r != next(iter(ranks.values())))
        raise LoraLoadError(f"{key}: rank {ranks[key]} differs from the other factors' rank")
    if ignored:
        more = f" and {len(ignored) - 10} more" if len(ignored) > 10 else ""
        logger.warning(
            "StyleAR release: ignored %d key(s) that are not LoRA factors: %s%s",
            len(ignored),
            ", ".join(ignored[:10]),
            more,
        )
    return ReleaseLora(out, next(iter(ranks.values())), tuple(ignored))


def convert_release_lora(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """:func:`read_release_lora` as ``(peft state dict, rank)``; keys other than factors are logged and ignored."""
    release = read_release_lora(state_dict)
    return release.state_dict, release.rank


def load_stylear_release(
    directory: str | Path,
    backbone: nn.Module,
    resampler: StyleResampler | None = None,
    adapter_name: str = DEFAULT_ADAPTER,
) -> nn.Module:
    """Load StyleAR's released pair from ``directory`` into ``backbone`` (and ``resampler``).

    ``model.safetensors`` holds the LoRA factors (converted by :func:`read_release_lora` and
    loaded as a rank-``r``, ``alpha = r``, no-dropout adapter; added if the backbone lacks it; its
    other keys are logged and ignored); ``image_proj.pth`` is the resampler's own state dict.
    Returns ``backbone``.
    """
    directory = Path(directory)
    lora_file = directory / RELEASE_LORA_NAME
    if not lora_file.is_file():
        raise FileNotFoundError(f"{directory}: no {RELEASE_LORA_NAME} (StyleAR LoRA factors)")
    release = read_release_lora(load_file(str(lora_file)))
    state, rank = release.state_dict, release.rank
    if not has_lora(backbone, adapter_name):
        add_lora(backbone, rank=rank, alpha=float(rank), dropout=0.0, adapter_name=adapter_name)
    else:
        config = adapter_config(backbone, adapter_name)
        if config.r != rank or float(config.lora_alpha) != float(rank):
            raise LoraLoadError(
                f"adapter {adapter_name!r} has r={config.r}, alpha={config.lora_alpha}; the release needs r=alpha={rank}"
            )
    dtype = next(p for n, p in backbone.named_parameters() if ".lora_" in n).dtype
    set_lora_state_dict(backbone, {k: v.to(dtype) for k, v in state.items()}, adapter_name)
    if resampler is not None:
        image_proj = directory / RELEASE_IMAGE_PROJ_NAME
        if not image_proj.is_file():
            raise FileNotFoundError(f"{directory}: no {RELEASE_IMAGE_PROJ_NAME} (StyleAR resampler weights)")
        load_image_proj(image_proj, resampler)
    return backbone


def describe_adapter(directory: str | Path) -> dict:
    """The adapter dir's ``adapter_config.json`` as a dict (rank, alpha, targets), for manifests and logs."""
    return json.loads((Path(directory) / ADAPTER_CONFIG_NAME).read_text())

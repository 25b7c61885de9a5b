"""Many style / subject LoRA adapters on one base model, swapped by copying weights into one peft LoRA slot.

An adapter is a directory under an adapters root (the ``adapter/`` directory a training run exports,
:mod:`stylear_core.training.export`, copied or linked there under the adapter's name)::

    <root>/<name>/manifest.json                      {"format": "stylear.adapter/1", "kind": "style" | "subject",
                                                       "subjects": [{"identifier": "sks", "class_noun": "dog"}], ...}
    <root>/<name>/adapter_model.safetensors          peft LoRA factors (+ adapter_config.json: r, lora_alpha)
                 (or lora.safetensors, same keys)     ... or StyleAR's release model.safetensors
    <root>/<name>/resampler.safetensors              optional: the adapter's own resampler (or image_proj.pth)

:func:`read_adapter_dir` is the one place that knows this layout. The base model gets one peft LoRA
layer set (:class:`AdapterSlot`, rank ``slot_rank`` on StyleAR's targets) when it is built;
activating an adapter copies its factors into that slot (zero-padded to the slot rank, its
``alpha / r`` scaling folded into ``B``), and "no adapter" zeroes ``B``. The base weights are never
reloaded or touched, the module structure never changes (so a captured CUDA graph stays valid),
and the copy costs a few MB per switch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from stylear_core.inference.defaults import ADAPTER_NAME_PATTERN
from stylear_core.models.lora import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    DEFAULT_ADAPTER,
    PEFT_KEY_PREFIX,
    RELEASE_IMAGE_PROJ_NAME,
    RELEASE_LORA_NAME,
    add_lora,
    convert_release_lora,
    save_lora,
)
from stylear_core.runs import MANIFEST, write_manifest
from stylear_core.training.export import ADAPTER_FORMAT, BACKBONE_WEIGHTS_NAME, RESAMPLER_WEIGHTS_NAME

PLAIN_LORA_NAME = "lora.safetensors"
RESAMPLER_NAME = RESAMPLER_WEIGHTS_NAME
SLOT_ADAPTER_NAME = "serving_slot"


class AdapterError(ValueError):
    """An adapter cannot be used (bad name, bad files, does not fit the model); the message says why."""


class AdapterNotFoundError(AdapterError, LookupError):
    """No adapter of that name under the adapters root."""


@dataclass
class AdapterWeights:
    """One adapter read from disk: LoRA factors in the slot's key layout, optional resampler state, manifest.

    ``lora`` maps peft names ``<module>.lora_A.weight`` ``(r, in)`` and ``<module>.lora_B.weight``
    ``(out, r)`` to tensors, with the adapter's scaling already multiplied into ``B``.
    """

    name: str
    lora: dict[str, torch.Tensor]
    rank: int
    resampler_state: dict[str, torch.Tensor] | None = None
    manifest: dict[str, Any] = field(default_factory=dict)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> AdapterWeights:
        """The same adapter with its tensors on ``device`` (LoRA factors cast to ``dtype`` if given)."""
        lora = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in self.lora.items()}
        return AdapterWeights(self.name, lora, self.rank, self.resampler_state, self.manifest)


def check_adapter_name(name: str) -> str:
    """``name`` if it is a plain directory name (letters, digits, ``._-``; no paths), else :class:`AdapterError`."""
    if not isinstance(name, str) or not ADAPTER_NAME_PATTERN.match(name):
        raise AdapterError(f"adapter name {name!r} must be 1-64 of letters, digits, '.', '_' or '-'")
    return name


def adapter_path(root: str | Path | None, name: str) -> Path:
    """The directory of adapter ``name``; raises :class:`AdapterNotFoundError` if it has no weights."""
    check_adapter_name(name)
    if not root:
        raise AdapterNotFoundError(f"adapter {name!r} not found: no adapters root is configured")
    path = Path(root) / name
    if not _weights_file(path):
        raise AdapterNotFoundError(f"adapter {name!r} not found under {root}")
    return path


def _weights_file(path: Path) -> Path | None:
    for file_name in (ADAPTER_WEIGHTS_NAME, PLAIN_LORA_NAME, RELEASE_LORA_NAME):
        if (path / file_name).is_file():
            return path / file_name
    return None


def read_manifest_of(path: Path) -> dict[str, Any]:
    """The adapter's ``manifest.json`` (empty if it has none)."""
    file = path / MANIFEST
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{file}: the manifest must be a JSON object")
    return data


def list_adapters(root: str | Path | None) -> list[dict[str, Any]]:
    """Every adapter under ``root``: ``{"name", "kind", "subjects", "format"}`` sorted by name."""
    if not root or not Path(root).is_dir():
        return []
    out = []
    for path in sorted(Path(root).iterdir()):
        if not path.is_dir() or not ADAPTER_NAME_PATTERN.match(path.name) or not _weights_file(path):
            continue
        try:
            manifest = read_manifest_of(path)
        except AdapterError:
            manifest = {}
        out.append(
            {
                "name": path.name,
                "kind": manifest.get("kind", "unknown"),
                "subjects": manifest.get("subjects", []),
                "format": manifest.get("format"),
            }
        )
    return out


def _lora_scaling(config: dict[str, Any]) -> tuple[int, float]:
    rank = int(config.get("r", config.get("rank", 0)))
    if rank <= 0:
        raise AdapterError(f"adapter config has no positive rank: {config}")
    alpha = float(config.get("lora_alpha", config.get("alpha", rank)))
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return rank, scaling


def read_adapter_dir(path: str | Path, name: str | None = None) -> AdapterWeights:
    """Read one adapter directory (see the module docstring) into :class:`AdapterWeights` on the CPU.

    Raises :class:`AdapterNotFoundError` when the directory holds no weights file and
    :class:`AdapterError` when a file is malformed.
    """
    path = Path(path)
    name = name or path.name
    weights = _weights_file(path)
    if weights is None:
        raise AdapterNotFoundError(
            f"{path}: no {ADAPTER_WEIGHTS_NAME}, {PLAIN_LORA_NAME} or {RELEASE_LORA_NAME}"
        )
    if (path / BACKBONE_WEIGHTS_NAME).is_file():
        raise AdapterError(
            f"{path}: a fully fine-tuned backbone, not a LoRA adapter; serve it as its own base model"
        )
    manifest = read_manifest_of(path)
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise AdapterError(f"{weights}: unreadable safetensors ({e})") from None
    if weights.name == RELEASE_LORA_NAME:
        lora, rank = convert_release_lora(tensors)
        scaling = 1.0  # the release applies x @ A @ B unscaled
    else:
        config_file = path / ADAPTER_CONFIG_NAME
        config = json.loads(config_file.read_text()) if config_file.is_file() else manifest.get("lora", {})
        rank, scaling = _lora_scaling(config)
        lora = {k.removeprefix(PEFT_KEY_PREFIX): v for k, v in tensors.items()}
    for key, tensor in lora.items():
        if not key.endswith((".lora_A.weight", ".lora_B.weight")) or tensor.ndim != 2:
            raise AdapterError(f"{weights}: {key!r} is not a LoRA factor")
        if key.endswith(".lora_B.weight"):
            lora[key] = tensor.float() * scaling
    resampler_state = None
    for file_name in (RESAMPLER_NAME, RELEASE_IMAGE_PROJ_NAME):
        file = path / file_name
        if file.is_file():
            if file.suffix == ".safetensors":
                resampler_state = load_file(str(file))
            else:
                resampler_state = torch.load(file, map_location="cpu", weights_only=True)
            break
    return AdapterWeights(name=name, lora=lora, rank=rank, resampler_state=resampler_state, manifest=manifest)


def write_adapter_dir(
    directory: str | Path,
    backbone: nn.Module,
    kind: str,
    adapter_name: str = DEFAULT_ADAPTER,
    subjects: list[dict[str, str]] | None = None,
    resampler: nn.Module | None = None,
    **manifest_fields: Any,
) -> Path:
    """Write ``backbone``'s LoRA adapter ``adapter_name`` (and ``resampler``) as a servable adapter dir.

    ``kind`` is ``style`` or ``subject``; ``subjects`` lists ``{"identifier", "class_noun"}`` for subject
    adapters. Returns the directory.
    """
    directory = Path(directory)
    save_lora(backbone, directory, adapter_name)
    if resampler is not None:
        state = {k: v.detach().cpu().contiguous() for k, v in resampler.state_dict().items()}
        save_file(state, str(directory / RESAMPLER_NAME))
    write_manifest(
        directory,
        ADAPTER_FORMAT,
        kind=kind,
        subjects=list(subjects or []),
        status="complete",
        **manifest_fields,
    )
    return directory


class AdapterSlot:
    """One peft LoRA adapter injected into ``backbone`` that every served adapter is copied into.

    ``rank`` is the largest adapter rank it takes. Built with ``B = 0`` (the base model's output, bit for
    bit). :meth:`activate` copies an :class:`AdapterWeights` in (or clears the slot for ``None``);
    ``active`` names what is in it.
    """

    def __init__(self, backbone: nn.Module, rank: int = 16) -> None:
        self.rank = rank
        add_lora(backbone, rank=rank, alpha=float(rank), adapter_name=SLOT_ADAPTER_NAME)
        backbone.requires_grad_(False)
        marker = f".{SLOT_ADAPTER_NAME}."
        self.params: dict[str, nn.Parameter] = {
            n.replace(marker, "."): p for n, p in backbone.named_parameters() if marker in n
        }
        self.active: str | None = None
        self.activate(None)

    @torch.no_grad()
    def activate(self, adapter: AdapterWeights | None) -> None:
        """Put ``adapter``'s factors in the slot (modules it does not adapt get zero); ``None`` clears it.

        Raises :class:`AdapterError` if the adapter's rank exceeds the slot's or a key or shape does not fit.
        """
        if adapter is None:
            for key, param in self.params.items():
                if key.endswith(".lora_B.weight"):
                    param.zero_()
            self.active = None
            return
        if adapter.rank > self.rank:
            raise AdapterError(
                f"adapter {adapter.name!r} has rank {adapter.rank}; the serving slot holds {self.rank}"
            )
        unknown = sorted(set(adapter.lora) - set(self.params))
        if unknown:
            raise AdapterError(f"adapter {adapter.name!r}: {unknown[0]!r} is not a LoRA target of this model")
        for key, tensor in adapter.lora.items():
            slot = self.params[key]
            is_a = key.endswith(".lora_A.weight")
            want = (tensor.shape[0], slot.shape[1]) if is_a else (slot.shape[0], tensor.shape[1])
            if tuple(tensor.shape) != want or tensor.shape[0 if is_a else 1] > self.rank:
                raise AdapterError(
                    f"adapter {adapter.name!r}: {key} has shape {tuple(tensor.shape)}, expected {want}"
                )
        for key, param in self.params.items():
            param.zero_()
            tensor = adapter.lora.get(key)
            if tensor is None:
                continue
            if key.endswith(".lora_A.weight"):
                param[: tensor.shape[0]].copy_(tensor)
            else:
                param[:, : tensor.shape[1]].copy_(tensor)
        self.active = adapter.name

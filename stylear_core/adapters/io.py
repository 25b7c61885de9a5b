"""Write, read, list and load adapter directories (the layout of :mod:`stylear_core.adapters.format`).

:func:`read_adapter_dir` is the one place that reads the served layout into :class:`AdapterWeights`
(LoRA factors with their ``alpha / r`` scaling folded into ``B``, the resampler state, the manifest);
:func:`load_adapter` puts an artefact onto a freshly built training-side model instead.
:func:`write_adapter_dir` writes a servable adapter from a model with a LoRA; the training export writes
through :func:`save_resampler_state`, :func:`save_backbone_state` and :func:`copy_adapter`.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from stylear_core.adapters.format import (
    ADAPTER_FORMAT,
    ADAPTER_NAME_PATTERN,
    BACKBONE_WEIGHTS_NAME,
    PLAIN_LORA_NAME,
    RESAMPLER_NAME,
    RESAMPLER_WEIGHTS_NAME,
    AdapterError,
    AdapterNotFoundError,
    check_adapter_name,
)
from stylear_core.models.lora import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    DEFAULT_ADAPTER,
    PEFT_KEY_PREFIX,
    RELEASE_IMAGE_PROJ_NAME,
    RELEASE_LORA_NAME,
    convert_release_lora,
    describe_adapter,
    load_lora,
    save_lora,
)
from stylear_core.models.resampler import load_image_proj
from stylear_core.models.stylear import StyleARModel
from stylear_core.runs import MANIFEST, write_manifest


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


def save_resampler_state(directory: str | Path, state: dict[str, torch.Tensor]) -> Path:
    """Write a resampler state dict (CPU tensors) as the adapter's ``resampler.safetensors``."""
    path = Path(directory) / RESAMPLER_WEIGHTS_NAME
    save_file(state, str(path))
    return path


def save_backbone_state(directory: str | Path, state: dict[str, torch.Tensor]) -> Path:
    """Write every backbone weight (full fine-tuning) as the adapter's ``backbone.safetensors``."""
    path = Path(directory) / BACKBONE_WEIGHTS_NAME
    save_file(state, str(path))
    return path


def copy_adapter(source: str | Path, target: str | Path, **manifest: Any) -> Path:
    """Copy the adapter files of ``source`` to ``target`` (replacing it) and write its manifest (format
    ``stylear.adapter/1``, ``status: complete``, the LoRA block, the file list, plus ``manifest`` fields
    such as ``base_model``, ``preset``, ``step``, ``metrics``). Returns ``target``."""
    target = Path(target)
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

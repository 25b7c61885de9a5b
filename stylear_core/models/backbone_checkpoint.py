"""Lumina-mGPT checkpoints -> :class:`~stylear_core.models.backbone.LuminaChameleonForCausalLM`.

:func:`load_lumina_backbone` reads a local Hugging Face-format checkpoint dir (``config.json`` plus
``model.safetensors``, a sharded index or ``*.safetensors``), builds the model on the meta device and
assigns the tensors in. :func:`convert_lumina_state_dict` maps the checkpoint's keys onto the model:
``model.vqmodel.*`` is dropped (the backbone holds no VQ weights) and Lumina's qk-norm parameters,
stored once per model-parallel shard ``(model_parallel_size, head_dim)``, are repeated per head
``(heads, head_dim)`` as transformers keeps them. Any key that does not belong, is missing or has the
wrong shape is a :class:`CheckpointError` naming it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from transformers.models.chameleon.modeling_chameleon import ChameleonRotaryEmbedding

from stylear_core.models.backbone import LuminaChameleonConfig, LuminaChameleonForCausalLM


class CheckpointError(ValueError):
    """A checkpoint does not match the model it is loaded into; the message names the offending key."""


def _expand_qk_norm(tensor: torch.Tensor, heads: int, key: str) -> torch.Tensor:
    """Lumina's qk-norm params are ``(model_parallel_size, head_dim)``; transformers' are ``(heads, head_dim)``."""
    if tensor.ndim != 2 or heads % tensor.shape[0]:
        raise CheckpointError(f"{key}: shape {tuple(tensor.shape)} does not divide {heads} heads")
    return tensor.repeat_interleave(heads // tensor.shape[0], dim=0)


def convert_lumina_state_dict(
    state_dict: Mapping[str, torch.Tensor], model: LuminaChameleonForCausalLM
) -> dict[str, torch.Tensor]:
    """Map a Lumina-mGPT / HF Chameleon state dict onto ``model``'s keys, checking every key and shape.

    ``model.vqmodel.*`` tensors are dropped (the backbone has no VQ model); qk-norm parameters stored
    per model-parallel shard are repeated per head. Raises :class:`CheckpointError` naming the first
    unexpected key, missing key or shape mismatch.
    """
    expected = model.state_dict()
    config = model.config
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key.startswith("model.vqmodel."):
            continue
        if key not in expected:
            raise CheckpointError(
                f"unexpected key {key!r} in the checkpoint (not a Lumina-mGPT backbone weight)"
            )
        want = expected[key].shape
        if tensor.shape != want and key.endswith(
            ("q_norm.weight", "q_norm.bias", "k_norm.weight", "k_norm.bias")
        ):
            heads = config.num_attention_heads if ".q_norm." in key else config.num_key_value_heads
            tensor = _expand_qk_norm(tensor, heads, key)
        if tensor.shape != want:
            raise CheckpointError(
                f"{key}: checkpoint shape {tuple(tensor.shape)}, model expects {tuple(want)}"
            )
        out[key] = tensor
    missing = sorted(set(expected) - set(out))
    if missing:
        raise CheckpointError(f"missing key {missing[0]!r} in the checkpoint ({len(missing)} missing)")
    return out


def _checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        return shards
    raise FileNotFoundError(f"{path}: no model.safetensors, model.safetensors.index.json or *.safetensors")


def _iter_safetensors(files: list[Path], dtype: torch.dtype | None, device: str | torch.device) -> Iterator:
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                if key.startswith("model.vqmodel."):
                    continue
                tensor = f.get_tensor(key)
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                yield key, tensor.to(device)


def load_lumina_backbone(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    mask_image_logits: bool | None = None,
    attn_implementation: str = "sdpa",
) -> LuminaChameleonForCausalLM:
    """Load a local Hugging Face-format Lumina-mGPT checkpoint dir (``config.json`` + safetensors).

    The model is built on the meta device and the checkpoint's tensors are assigned in (cast to
    ``dtype`` when given, else kept as stored), so no random 7B init is paid. ``mask_image_logits``
    overrides the config's value when not None. Raises :class:`CheckpointError` naming any key that
    does not belong to the backbone, is missing, or has the wrong shape.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face-format Lumina-mGPT dir)")
    config = LuminaChameleonConfig.from_pretrained(str(path))
    if mask_image_logits is not None:
        config.mask_image_logits = mask_image_logits
    config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = LuminaChameleonForCausalLM(config)
    state = dict(_iter_safetensors(_checkpoint_files(path), dtype, device))
    state = convert_lumina_state_dict(state, model)
    model.load_state_dict(state, strict=True, assign=True)
    # Non-persistent RoPE buffers were built on meta: rebuild them on the target device.
    model.model.rotary_emb = ChameleonRotaryEmbedding(config=config).to(device)
    leftover = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise CheckpointError(f"{leftover[0]} was not loaded from the checkpoint")
    return model.eval()

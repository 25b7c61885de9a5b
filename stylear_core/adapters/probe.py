"""The probe an adapter export records: one training batch and the trained model's outputs on it.

:func:`make_probe` takes it from a collated batch, :func:`probe_outputs` runs it, :func:`write_probe` saves
it as ``probe.safetensors`` beside the weights, and :func:`verify_adapter` reruns it on a model with the
adapter loaded and returns the largest difference to what training recorded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from stylear_core.adapters.format import PROBE_NAME
from stylear_core.models.stylear import StyleARModel, image_token_log_probs, sequence_labels

PROBE_MAX_POSITIONS = 64  # logits kept per probe: enough to pin the model down, small at vocab 65536


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

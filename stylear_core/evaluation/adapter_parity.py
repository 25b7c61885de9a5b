"""Does the served adapter compute what the trained one did? The export probe, rerun on the serving path.

A training run's adapter directory holds a probe (``probe.safetensors``: one training batch and the
logits / log-probs the trained model gave on it, see :mod:`stylear_core.adapters.probe`). Serving
does not load adapters the way training built them: it copies the LoRA factors into one peft slot of
a fixed rank with the ``alpha / r`` scaling folded into ``B`` (:class:`~stylear_core.inference.adapters.AdapterSlot`)
and loads the adapter's resampler into a copy of the base resampler. :func:`served_adapter_parity`
builds exactly that and reruns the probe, so an adapter is only exported when the served model
reproduces the trained one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from stylear_core.models.presets import ModelConfig


def served_adapter_parity(
    model_cfg: ModelConfig, adapter_dir: str | Path, slot_rank: int, device: str = "cpu"
) -> float:
    """The largest absolute difference between the adapter's recorded probe outputs and the same probe
    through the serving path (fresh base backbone + :class:`AdapterSlot` of ``slot_rank`` filled by
    :func:`read_adapter_dir`, the adapter's resampler). Raises ``ValueError`` for a full-backbone
    artefact, which the slot cannot serve."""
    from stylear_core.adapters.format import BACKBONE_WEIGHTS_NAME
    from stylear_core.adapters.io import read_adapter_dir
    from stylear_core.adapters.probe import verify_adapter
    from stylear_core.inference.adapters import AdapterSlot
    from stylear_core.models.presets import build_backbone, build_resampler, build_style_encoder
    from stylear_core.models.resampler import load_image_proj
    from stylear_core.models.stylear import StyleARModel

    adapter_dir = Path(adapter_dir)
    if (adapter_dir / BACKBONE_WEIGHTS_NAME).is_file():
        raise ValueError(f"{adapter_dir}: a full-backbone artefact cannot be served through a LoRA slot")
    dev = torch.device(device)
    weights = read_adapter_dir(adapter_dir)
    backbone, vocab = build_backbone(model_cfg, dev)
    slot = AdapterSlot(backbone, rank=slot_rank)
    slot.activate(weights.to(dev))
    encoder = build_style_encoder(model_cfg, dev)
    resampler = build_resampler(model_cfg, encoder.width, backbone.config.hidden_size, dev)
    if weights.resampler_state is not None:
        load_image_proj(weights.resampler_state, resampler)
    model = StyleARModel(backbone, encoder, resampler, vocab).eval()
    return verify_adapter(model, adapter_dir)

"""Does the served adapter compute what the trained one did? The export probe, rerun on the serving path.

A training run's adapter directory holds a probe (``probe.safetensors``: one training batch and the
logits / log-probs the trained model gave on it, see :mod:`stylear_core.adapters.probe`). Serving
does not load adapters the way training built them: it copies the LoRA factors into one peft slot of
a fixed rank with the ``alpha / r`` scaling folded into ``B`` (:class:`~stylear_core.inference.adapters.AdapterSlot`)
and loads the adapter's resampler into a copy of the base resampler. :func:`served_adapter_parity`
builds the serving replica's own generator (:class:`~stylear_core.inference.generator.StyleARGenerator`
in slot mode, the adapter read and activated by the same methods the replica calls) and reruns the probe, so an adapter is only exported when the served model
reproduces the trained one.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from stylear_core.models.presets import ModelConfig

if TYPE_CHECKING:
    from stylear_core.inference.generator import ServedAdapter, StyleARGenerator


def served_generator(
    model_cfg: ModelConfig, adapter_dir: str | Path, slot_rank: int, device: str = "cpu"
) -> tuple[StyleARGenerator, ServedAdapter]:
    """The generator a serving replica builds (base backbone with a LoRA slot of ``slot_rank``), with the
    adapter read and activated as the replica does for a request naming it (returned beside it: its
    resampler goes with each call). Raises ``ValueError`` for a
    full-backbone artefact, which the slot cannot serve.

    The engine keeps the model's dtype: the probe was recorded in it, and the gate checks how the adapter
    is mapped into the slot, not the serving engine's reduced precision on a GPU.
    """
    from stylear_core.adapters.format import BACKBONE_WEIGHTS_NAME
    from stylear_core.inference.generator import StyleARGenerator

    adapter_dir = Path(adapter_dir)
    if (adapter_dir / BACKBONE_WEIGHTS_NAME).is_file():
        raise ValueError(f"{adapter_dir}: a full-backbone artefact cannot be served through a LoRA slot")
    generator = StyleARGenerator(
        model_cfg, device=device, adapter_slot_rank=slot_rank, engine_dtype=model_cfg.torch_dtype
    )
    adapter = generator.read_adapter(adapter_dir)
    generator.activate(adapter)
    return generator, adapter


def served_adapter_parity(
    model_cfg: ModelConfig, adapter_dir: str | Path, slot_rank: int, device: str = "cpu"
) -> float:
    """The largest absolute difference between the adapter's recorded probe outputs and the same probe
    through the serving path (:func:`served_generator`: the serving replica's generator with the adapter
    in its LoRA slot and the adapter's resampler). Raises ``ValueError`` for a full-backbone artefact,
    which the slot cannot serve."""
    from stylear_core.adapters.probe import verify_adapter

    generator, adapter = served_generator(model_cfg, adapter_dir, slot_rank, device)
    return verify_adapter(generator.stylear_model(adapter.resampler), adapter_dir)

"""Many style / subject LoRA adapters on one base model, swapped by copying weights into one peft LoRA slot.

Adapters are directories under an adapters root in the layout of :mod:`stylear_core.adapters.format`,
read into :class:`~stylear_core.adapters.io.AdapterWeights` by
:func:`~stylear_core.adapters.io.read_adapter_dir`. The base model gets one peft LoRA
layer set (:class:`AdapterSlot`, rank ``slot_rank`` on StyleAR's targets) when it is built;
activating an adapter copies its factors into that slot (zero-padded to the slot rank, its
``alpha / r`` scaling folded into ``B``), and "no adapter" zeroes ``B``. The base weights are never
reloaded or touched, the module structure never changes (so a captured CUDA graph stays valid),
and the copy costs a few MB per switch.
"""

from __future__ import annotations

import torch
from torch import nn

from stylear_core.adapters.format import AdapterError
from stylear_core.adapters.io import AdapterWeights
from stylear_core.models.lora import add_lora

SLOT_ADAPTER_NAME = "serving_slot"


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

"""Rows with different LoRA adapters (or none) in one forward: per-row adapter indices over stacked factors.

The idea of S-LoRA / Punica's BGMV in plain torch. Every LoRA target linear of the backbone becomes a
:class:`MultiLoraLinear`: the frozen base weight plus the factors of up to ``capacity`` adapters stacked
in fixed buffers, ``A (n, r_max, in)`` and ``B (n, out, r_max)`` with a per-adapter ``scaling (n,)``,
where ``n = capacity + 1``. Slot :data:`BASE_SLOT` (0) holds zeros and means "no adapter"; adapters of a
rank below ``r_max`` are zero-padded, which adds exact zeros. A forward over ``x`` of shape
``(rows, ..., in)`` computes, per row ``i`` with adapter index ``idx[i]``::

    base(x) + scaling[idx] * ((x @ A[idx]^T) @ B[idx]^T)

with the factors gathered by index and two batched matmuls (``torch.bmm``), or (mode ``stacked``) with
every slot's factors in two dense matmuls and the slots a row does not use masked to zero; gathering
copies ``rows`` adapters' factors, stacking reads ``capacity + 1``, so which is cheaper depends on rows
vs capacity. The indices live in one :class:`RowAdapters` tensor shared by every layer;
:meth:`MultiLoraPool.set_rows` writes it in place, so buffers and shapes never change between steps and
a captured CUDA graph replays with new indices. A single index applies to every row.

:class:`MultiLoraPool` converts a backbone's target linears, loads adapters (the project's adapter
directory, :class:`~stylear_core.adapters.io.AdapterWeights`, or a peft LoRA state dict) into free
slots, evicts the least recently used adapter when full (never one the current rows use), and says
which slot holds which adapter. Each StyleAR adapter also has its own resampler; style tokens are
computed per request before decoding, so only the LoRA part lives here.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.nn import functional as F

from stylear_core.adapters.format import AdapterError
from stylear_core.adapters.io import AdapterWeights, read_adapter_dir
from stylear_core.models.lora import LORA_TARGET_MODULES

BASE_SLOT = 0
"""The adapter index of a row that runs the base model (no adapter): its factors are zeros."""

LORA_MODES = ("gather", "stacked")
"""How a :class:`MultiLoraLinear` applies per-row adapters: ``gather`` copies each row's factors out of the
stack (reads ``rows`` adapters' factors); ``stacked`` runs every slot's factors and masks per row (reads
``capacity + 1`` adapters' factors). Same result; the cheaper one depends on rows vs capacity."""

_A_SUFFIX, _B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


class PoolFullError(AdapterError):
    """Every slot holds an adapter that the current rows use, so none can be evicted."""


class RowAdapters:
    """The per-row adapter indices shared by every :class:`MultiLoraLinear` of one backbone.

    ``index`` is a ``(rows,)`` long tensor on the model's device. There is one such tensor per row
    count, kept for the pool's life, and :meth:`set` copies into it in place: a graph captured for a
    row count keeps reading the same storage, however the row count changes in between.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._by_rows: dict[int, torch.Tensor] = {}
        self.index = self._buffer(1)

    def _buffer(self, rows: int) -> torch.Tensor:
        if rows not in self._by_rows:
            self._by_rows[rows] = torch.zeros(rows, dtype=torch.long, device=self.device)
        return self._by_rows[rows]

    def set(self, indices: Sequence[int] | torch.Tensor) -> None:
        """Use ``indices`` (one adapter index per row; :data:`BASE_SLOT` for the base) from the next forward."""
        new = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        buffer = self._buffer(new.shape[0])
        buffer.copy_(new)
        self.index = buffer


class MultiLoraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus the stacked LoRA factors of up to ``capacity`` adapters, chosen per row.

    Shares ``weight`` and ``bias`` with the wrapped linear (same parameter objects, same state-dict keys
    as the linear had). The factor buffers are not persistent: they belong to the pool, not to the model.
    Each row of ``x`` (the first dimension) uses the adapter whose index ``rows.index`` gives it; a single
    index applies to every row (a batch of one adapter, whatever its row count).
    """

    def __init__(
        self, base: nn.Linear, capacity: int, max_rank: int, rows: RowAdapters, mode: str = "gather"
    ) -> None:
        super().__init__()
        if mode not in LORA_MODES:
            raise ValueError(f"mode must be one of {LORA_MODES}, got {mode!r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rows = rows
        self.max_rank, self.mode = max_rank, mode
        n = capacity + 1
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.register_buffer(
            "lora_a", torch.zeros(n, max_rank, self.in_features, **factory), persistent=False
        )
        # B is stored (out, n, r) so that all adapters' B is one (out, n * r) matrix for the stacked mode;
        # ``lora_b`` is its (n, out, r) view.
        self.register_buffer(
            "lora_b_packed", torch.zeros(self.out_features, n, max_rank, **factory), persistent=False
        )
        self.register_buffer("scaling", torch.zeros(n, **factory), persistent=False)

    @property
    def lora_b(self) -> torch.Tensor:
        """The stacked ``B`` factors as ``(n, out, r_max)`` (a view of ``lora_b_packed``)."""
        return self.lora_b_packed.permute(1, 0, 2)

    @torch.no_grad()
    def put(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None, scaling: float) -> None:
        """Write one adapter's ``A (r, in)`` and ``B (out, r)`` into ``slot`` (zero-padded to ``max_rank``).

        ``a = b = None`` leaves the slot at zero: the adapter does not adapt this module.
        """
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.scaling[slot] = 0.0
        if a is None:
            return
        rank = a.shape[0]
        self.lora_a[slot, :rank].copy_(a)
        self.lora_b[slot, :, :rank].copy_(b)
        self.scaling[slot] = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x)`` plus, for each row ``i``, adapter ``rows.index[i]``'s scaled LoRA update."""
        out = F.linear(x, self.weight, self.bias)
        index = self.rows.index
        rows = x.shape[0]
        if index.shape[0] == 1 and rows != 1:
            index = index.expand(rows)  # one index set: every row uses that adapter
        elif index.shape[0] != rows:
            raise ValueError(
                f"the input has {rows} rows but {index.shape[0]} adapter indices are set (MultiLoraPool.set_rows)"
            )
        flat = x.reshape(rows, -1, self.in_features).to(self.lora_a.dtype)
        if self.mode == "gather":
            # Gather each row's factors, then the shrink and the expand as two batched matmuls (BGMV in torch).
            hidden = torch.bmm(flat, self.lora_a[index].transpose(1, 2))
            hidden = hidden * self.scaling[index].view(rows, 1, 1)
            delta = torch.bmm(hidden, self.lora_b[index].transpose(1, 2))
        else:
            # Shrink through every slot's A at once, zero the slots a row does not use (and scale the one
            # it does), expand through every slot's B at once: two dense matmuls, no gathered copies.
            n, r = self.lora_a.shape[:2]
            hidden = F.linear(flat, self.lora_a.view(n * r, self.in_features)).view(rows, -1, n, r)
            select = (torch.arange(n, device=index.device) == index.unsqueeze(1)) * self.scaling
            hidden = (hidden * select.view(rows, 1, n, 1)).view(rows, -1, n * r)
            delta = F.linear(hidden, self.lora_b_packed.view(self.out_features, n * r))
        return out + delta.reshape(out.shape).to(out.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"slots={self.lora_a.shape[0]}, max_rank={self.max_rank}"
        )


def _base_linear(module: nn.Module) -> nn.Module:
    # A peft LoRA layer is replaced by the linear it wraps: its own adapters are dropped.
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


class MultiLoraPool:
    """A bounded pool of LoRA adapters served together: rows of one batch each pick their own adapter.

    Converts, in place, every ``nn.Linear`` of ``backbone`` whose last name component is in
    ``target_modules`` (a peft LoRA layer there is replaced by its base linear) into a
    :class:`MultiLoraLinear` with ``capacity`` adapter slots of rank up to ``max_rank``. Slots are
    numbered ``1..capacity``; :data:`BASE_SLOT` (0) is the base model. :meth:`load` puts an adapter in
    a free slot, evicting the least recently used one when full; :meth:`set_rows` (or
    :meth:`set_row_adapters`, by name) sets each row's adapter for the following forwards. ``mode``
    picks how the layers apply them (:data:`LORA_MODES`); both give the same outputs.
    """

    def __init__(
        self,
        backbone: nn.Module,
        capacity: int,
        max_rank: int = 16,
        target_modules: Sequence[str] = LORA_TARGET_MODULES,
        mode: str = "gather",
    ) -> None:
        if capacity < 1 or max_rank < 1:
            raise ValueError(f"capacity ({capacity}) and max_rank ({max_rank}) must be at least 1")
        self.backbone = backbone
        self.capacity, self.max_rank = capacity, max_rank
        self.rows = RowAdapters(next(backbone.parameters()).device)
        self.layers: dict[str, MultiLoraLinear] = {}
        targets = set(target_modules)
        for name, module in list(backbone.named_modules()):
            if name.rsplit(".", 1)[-1] not in targets or isinstance(module, MultiLoraLinear):
                continue
            linear = _base_linear(module)
            if not isinstance(linear, nn.Linear):
                continue
            layer = MultiLoraLinear(linear, capacity, max_rank, self.rows, mode)
            parent_name, _, child = name.rpartition(".")
            setattr(backbone.get_submodule(parent_name) if parent_name else backbone, child, layer)
            self.layers[name] = layer
        if not self.layers:
            raise ValueError(f"the backbone has no nn.Linear named any of {sorted(targets)}")
        backbone.requires_grad_(False)
        # adapter name -> slot, least recently used first.
        self._slots: OrderedDict[str, int] = OrderedDict()
        self._pinned: frozenset[int] = frozenset()

    @property
    def mode(self) -> str:
        """How the layers apply per-row adapters (see :data:`LORA_MODES`); set it to switch every layer."""
        return next(iter(self.layers.values())).mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in LORA_MODES:
            raise ValueError(f"mode must be one of {LORA_MODES}, got {mode!r}")
        for layer in self.layers.values():
            layer.mode = mode

    @property
    def slots(self) -> dict[str, int]:
        """Which slot holds which adapter (adapter name -> slot), least recently used first."""
        return dict(self._slots)

    def slot_of(self, name: str | None) -> int | None:
        """The slot holding adapter ``name`` (:data:`BASE_SLOT` for ``None``), or ``None`` if not loaded."""
        return BASE_SLOT if name is None else self._slots.get(name)

    def touch(self, name: str) -> int:
        """Mark adapter ``name`` as just used (last to be evicted); returns its slot. KeyError if not loaded."""
        self._slots.move_to_end(name)
        return self._slots[name]

    def evict(self, name: str, force: bool = False) -> int:
        """Remove adapter ``name`` from the pool (its slot's factors are zeroed); returns the freed slot.

        Raises :class:`PoolFullError` if the current rows use it (set other rows first), unless ``force``:
        for a caller that knows no further forward runs those rows (they finished, and an idle engine
        never sets new ones).
        """
        if self._slots[name] in self._pinned and not force:
            raise PoolFullError(f"adapter {name!r} is used by the current rows and cannot be evicted")
        slot = self._slots.pop(name)
        for layer in self.layers.values():
            layer.put(slot, None, None, 0.0)
        return slot

    def _free_slot(self) -> int:
        used = set(self._slots.values())
        for slot in range(1, self.capacity + 1):
            if slot not in used:
                return slot
        for name, slot in self._slots.items():  # least recently used first
            if slot not in self._pinned:
                return self.evict(name)
        raise PoolFullError(
            f"all {self.capacity} adapter slots are used by the current rows; none can be evicted"
        )

    def load(
        self,
        name: str,
        state_dict: Mapping[str, torch.Tensor],
        scaling: float = 1.0,
        replace: bool = False,
    ) -> int:
        """Load adapter ``name`` from its peft LoRA state dict; returns its slot.

        ``state_dict`` maps ``<module>.lora_A.weight`` ``(r, in)`` and ``<module>.lora_B.weight``
        ``(out, r)`` (an optional ``base_model.model.`` prefix is dropped); ``scaling`` is peft's
        ``alpha / r`` (1 when it is already folded into ``B``, as in :class:`AdapterWeights`).
        Modules it does not name get no update. An adapter already loaded is only marked used,
        unless ``replace``. Raises :class:`AdapterError` for a key, shape or rank that does not fit
        (the pool is unchanged then) and :class:`PoolFullError` when no slot can be freed.
        """
        if name in self._slots and not replace:
            return self.touch(name)
        factors = self._check(name, state_dict)
        slot = self._slots.pop(name) if name in self._slots else self._free_slot()
        for module, layer in self.layers.items():
            a, b = factors.get(module, (None, None))
            layer.put(slot, a, b, scaling)
        self._slots[name] = slot
        return slot

    def load_weights(self, adapter: AdapterWeights, replace: bool = False) -> int:
        """Load an adapter read by :func:`~stylear_core.adapters.io.read_adapter_dir` (scaling folded into B)."""
        return self.load(adapter.name, adapter.lora, scaling=1.0, replace=replace)

    def load_dir(self, path: str | Path, name: str | None = None, replace: bool = False) -> int:
        """Load the project's adapter directory at ``path`` (named ``name`` or the directory's name)."""
        return self.load_weights(read_adapter_dir(path, name), replace=replace)

    def _check(
        self, name: str, state_dict: Mapping[str, torch.Tensor]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state_dict.items():
            key = key.removeprefix("base_model.model.")
            if key.endswith(_A_SUFFIX):
                module, factor = key[: -len(_A_SUFFIX)], "a"
            elif key.endswith(_B_SUFFIX):
                module, factor = key[: -len(_B_SUFFIX)], "b"
            else:
                raise AdapterError(f"adapter {name!r}: {key!r} is not a LoRA factor")
            if module not in self.layers:
                raise AdapterError(f"adapter {name!r}: {key!r} is not a LoRA target of this model")
            pairs.setdefault(module, {})[factor] = tensor
        out = {}
        for module, pair in pairs.items():
            if set(pair) != {"a", "b"}:
                raise AdapterError(f"adapter {name!r}: {module} needs both lora_A and lora_B")
            layer, a, b = self.layers[module], pair["a"], pair["b"]
            rank = a.shape[0]
            if (
                a.ndim != 2
                or b.ndim != 2
                or a.shape[1] != layer.in_features
                or b.shape != (layer.out_features, rank)
            ):
                raise AdapterError(
                    f"adapter {name!r}: {module} has A {tuple(a.shape)} and B {tuple(b.shape)}, expected "
                    f"({rank}, {layer.in_features}) and ({layer.out_features}, {rank})"
                )
            if rank > self.max_rank:
                raise AdapterError(
                    f"adapter {name!r} has rank {rank}; the pool holds at most {self.max_rank}"
                )
            out[module] = (a, b)
        if not out:
            raise AdapterError(f"adapter {name!r} has no LoRA factors")
        return out

    def set_rows(self, indices: Sequence[int] | torch.Tensor) -> None:
        """Set each row's adapter index (a slot, or :data:`BASE_SLOT`) for the following forwards.

        One index applies to every row of any batch (all rows on one adapter, as a batch-at-a-time engine
        runs). Pass a list or a CPU tensor (a device tensor is read back to check it, a sync). The slots
        used here count as just used (LRU) and are pinned: neither :meth:`load` nor :meth:`evict` frees
        them until the rows change.
        """
        values = torch.as_tensor(indices, dtype=torch.long).reshape(-1).cpu()
        used = set(values.tolist())
        if used and (min(used) < 0 or max(used) > self.capacity):
            raise ValueError(f"adapter indices must be in 0..{self.capacity}, got {values.tolist()}")
        empty = sorted(used - set(self._slots.values()) - {BASE_SLOT})
        if empty:
            raise ValueError(f"slot(s) {empty} hold no adapter")
        self.rows.set(values)
        self._pinned = frozenset(used)
        for name, slot in list(self._slots.items()):
            if slot in used:
                self._slots.move_to_end(name)

    def set_row_adapters(self, names: Sequence[str | None]) -> list[int]:
        """Set each row's adapter by name (``None`` for the base); each must be loaded. Returns the indices."""
        indices = []
        for name in names:
            if name is not None and name not in self._slots:
                raise KeyError(f"adapter {name!r} is not loaded in the pool")
            indices.append(BASE_SLOT if name is None else self.touch(name))
        self.set_rows(indices)
        return indices

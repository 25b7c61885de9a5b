"""Reproducible raw : stylized mixing of curated records (StyleAR: about 3 raw pairs per stylized one).

With only one kind of pair (raw pairs alone, or stylized pairs alone) every pair of that kind is kept.

Selection ranks each id by a keyed hash of ``(seed, id)`` and keeps the lowest-ranked ones, so it
depends only on the id sets and the seed (not on their order or on how the data was split into
blocks), and any worker can tell from an id alone whether it ranks among the first ``k``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class MixSelection:
    """The ids kept from each side, in their input order."""

    raw_ids: tuple[str, ...]
    stylized_ids: tuple[str, ...]

    @property
    def ratio(self) -> float:
        """Achieved raw : stylized ratio (``inf`` when no stylized id is kept)."""
        return len(self.raw_ids) / len(self.stylized_ids) if self.stylized_ids else float("inf")


def selection_key(record_id: str, seed: int) -> int:
    """The rank key of ``record_id`` under ``seed``: a 64-bit BLAKE2b hash, stable across processes."""
    digest = hashlib.blake2b(record_id.encode(), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "big")


def _sample(ids: Sequence[str], count: int, seed: int) -> tuple[str, ...]:
    if count >= len(ids):
        return tuple(ids)
    chosen = set(sorted(ids, key=lambda i: (selection_key(i, seed), i))[:count])
    return tuple(i for i in ids if i in chosen)


def mix_raw_and_stylized(
    raw_ids: Sequence[str], stylized_ids: Sequence[str], ratio: float = 3.0, seed: int = 0
) -> MixSelection:
    """Choose ids so that raw : stylized is ``ratio`` (rounded), keeping as much data as possible.

    Normally every stylized id is kept and ``round(ratio * len(stylized_ids))`` raw ids are sampled;
    when raw ids are too few for that, every raw id is kept and ``round(len(raw_ids) / ratio)``
    stylized ids are sampled instead (at least one). When one side is empty no ratio is reachable and
    every id of the other side is kept: raw pairs alone (a user's own data, or stylization switched
    off) are the whole data set, and so are stylized pairs alone. Whether an empty stylized side was
    expected is the caller's to judge (the curation pipeline stops when stylization was asked for and
    made nothing). Deterministic in ``seed`` and the id sets. Raises ``ValueError`` for a ratio <= 0
    or a duplicated id.
    """
    if not ratio > 0:
        raise ValueError(f"ratio must be positive, got {ratio}")
    raw_ids = [str(i) for i in raw_ids]
    stylized_ids = [str(i) for i in stylized_ids]
    for name, ids in (("raw", raw_ids), ("stylized", stylized_ids)):
        if len(set(ids)) != len(ids):
            raise ValueError(f"{name} ids contain duplicates")
    # No ratio is reachable with one side empty: keep the other side whole rather than nothing
    # (``round(ratio * 0)`` raw ids would be none at all).
    if not raw_ids or not stylized_ids:
        return MixSelection(tuple(raw_ids), tuple(stylized_ids))
    wanted_raw = round(ratio * len(stylized_ids))
    if wanted_raw <= len(raw_ids):
        return MixSelection(_sample(raw_ids, wanted_raw, seed), tuple(stylized_ids))
    wanted_stylized = max(1, round(len(raw_ids) / ratio))
    # A different key for the stylized side, so the two samples are not correlated through shared ids.
    return MixSelection(tuple(raw_ids), _sample(stylized_ids, wanted_stylized, seed + 1))

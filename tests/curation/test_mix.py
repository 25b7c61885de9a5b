"""Raw : stylized mixing: the ratio within 5%, deterministic by seed, independent of input order."""

from __future__ import annotations

import pytest

from stylear_core.curation.mix import mix_raw_and_stylized, selection_key


def ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i:05d}" for i in range(n)]


@pytest.mark.parametrize(
    ("n_raw", "n_sty", "ratio"), [(10_000, 1_000, 3.0), (1_000, 1_000, 3.0), (500, 37, 2.5)]
)
def test_ratio_within_five_percent(n_raw, n_sty, ratio):
    sel = mix_raw_and_stylized(ids("r", n_raw), ids("s", n_sty), ratio=ratio, seed=0)
    assert abs(sel.ratio - ratio) / ratio <= 0.05
    assert set(sel.raw_ids) <= set(ids("r", n_raw)) and set(sel.stylized_ids) <= set(ids("s", n_sty))


def test_uses_all_stylized_when_raw_is_plentiful_and_all_raw_when_scarce():
    plenty = mix_raw_and_stylized(ids("r", 10_000), ids("s", 1_000), ratio=3.0, seed=1)
    assert len(plenty.stylized_ids) == 1_000 and len(plenty.raw_ids) == 3_000
    scarce = mix_raw_and_stylized(ids("r", 900), ids("s", 1_000), ratio=3.0, seed=1)
    assert len(scarce.raw_ids) == 900 and len(scarce.stylized_ids) == 300


def test_deterministic_by_seed_and_order_independent():
    raw, sty = ids("r", 2_000), ids("s", 100)
    a = mix_raw_and_stylized(raw, sty, seed=7)
    assert a == mix_raw_and_stylized(raw, sty, seed=7)
    shuffled = mix_raw_and_stylized(list(reversed(raw)), sty, seed=7)
    assert set(shuffled.raw_ids) == set(a.raw_ids)
    assert list(shuffled.raw_ids) == [i for i in reversed(raw) if i in set(a.raw_ids)]  # input order kept
    other = mix_raw_and_stylized(raw, sty, seed=8)
    assert set(other.raw_ids) != set(a.raw_ids)
    assert selection_key("r-00001", 7) == selection_key("r-00001", 7) != selection_key("r-00001", 8)


def test_sample_is_spread_not_a_prefix():
    sel = mix_raw_and_stylized(ids("r", 10_000), ids("s", 1_000), ratio=3.0, seed=0)
    picked = [int(i.split("-")[1]) for i in sel.raw_ids]
    # A uniform sample of 3000 from 10000: about 30% of each tenth.
    for lo in range(0, 10_000, 1_000):
        share = sum(lo <= p < lo + 1_000 for p in picked) / 1_000
        assert 0.22 < share < 0.38


def test_raw_only_input_keeps_every_raw_pair():
    # A user with only raw (prompt, image) pairs, or with stylization off: no ratio is reachable, and
    # the raw pairs are the whole data set (the ratio rule alone would keep round(3 * 0) = 0 of them).
    raw = ids("r", 40)
    sel = mix_raw_and_stylized(raw, [], ratio=3.0, seed=0)
    assert sel.raw_ids == tuple(raw) and sel.stylized_ids == ()
    assert mix_raw_and_stylized([], []) == mix_raw_and_stylized([], [], ratio=0.5, seed=3)


def test_edge_cases():
    assert mix_raw_and_stylized([], ids("s", 5)).stylized_ids == tuple(ids("s", 5))
    tiny = mix_raw_and_stylized(ids("r", 2), ids("s", 10), ratio=3.0)
    assert len(tiny.raw_ids) == 2 and len(tiny.stylized_ids) == 1
    with pytest.raises(ValueError, match="positive"):
        mix_raw_and_stylized(ids("r", 5), ids("s", 5), ratio=0)
    with pytest.raises(ValueError, match="duplicates"):
        mix_raw_and_stylized(["a", "a"], ["b"])

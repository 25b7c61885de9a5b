"""ClipFilter: open_clip text scores, rows under the threshold marked as dropped and counted, bad rows isolated."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from stylear_core.curation.clip_filter import ClipFilter, ClipFilterConfig
from stylear_core.data.images import decode_image
from stylear_core.data.synthetic import SyntheticStyleSet, corrupt_bytes
from stylear_core.models.clip import ClipScorer


@pytest.fixture(scope="module")
def pairs() -> list[dict]:
    rows = SyntheticStyleSet(seed=3, size=64).stylized_pairs(12, num_styles=4)
    for r in rows:
        r["error"] = None
    return rows


@pytest.fixture(scope="module")
def reference_scores(pairs) -> np.ndarray:
    """Scores from a ClipScorer built independently with the filter's seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        scorer = ClipScorer.from_preset("tiny")
    images = [decode_image(r["image"]) for r in pairs]
    return scorer.text_score(images, [r["prompt"] for r in pairs]).numpy()


def _batch(rows: list[dict]) -> dict[str, np.ndarray]:
    out = {}
    for key in rows[0]:
        col = np.empty(len(rows), dtype=object)
        for i, r in enumerate(rows):
            col[i] = r[key]
        out[key] = col
    return out


def test_rows_under_threshold_are_marked_dropped_and_counted(pairs, reference_scores):
    threshold = float(np.median(reference_scores))
    clip_filter = ClipFilter(ClipFilterConfig(preset="tiny", threshold=threshold, seed=7, batch_size=5))
    out = clip_filter(_batch(pairs))

    scores = out.column("clip_text_score").to_numpy(zero_copy_only=False)
    np.testing.assert_allclose(scores, reference_scores, atol=1e-5)
    below = reference_scores < threshold
    errors = out.column("error").to_pylist()
    stages = out.column("error_stage").to_pylist()
    assert [e is not None for e in errors] == below.tolist()
    for e, s, score in zip(errors, stages, scores):
        if e is not None:
            assert s == "clip_filter" and f"{score:.4f}" in e and "below threshold" in e
        else:
            assert s is None and score >= threshold
    assert (clip_filter.kept, clip_filter.dropped) == (int((~below).sum()), int(below.sum()))
    assert 0 < clip_filter.dropped < len(pairs)
    # Every input column leaves unchanged, in order.
    assert out.column("id").to_pylist() == [r["id"] for r in pairs]
    assert out.column("image").to_pylist() == [r["image"] for r in pairs]
    assert out.column("seed").to_pylist() == [r["seed"] for r in pairs]


def test_bad_and_failed_rows_do_not_stop_the_batch(pairs, reference_scores):
    rows = [dict(r) for r in pairs[:4]]
    rows[1]["image"] = corrupt_bytes("truncated")
    rows[2]["error"] = "generation: RuntimeError: out of memory"
    rows[2]["image"] = None
    rows[3]["prompt"] = "  "
    clip_filter = ClipFilter(ClipFilterConfig(preset="tiny", threshold=-1.0, seed=7))
    out = clip_filter(pa.Table.from_pylist(rows))  # a pyarrow batch works as well as a numpy one

    errors = out.column("error").to_pylist()
    stages = out.column("error_stage").to_pylist()
    scores = out.column("clip_text_score").to_pylist()
    assert errors[0] is None and scores[0] == pytest.approx(float(reference_scores[0]), abs=1e-5)
    assert "unreadable image" in errors[1] and stages[1] == "clip_filter" and scores[1] is None
    # A row failed upstream keeps its reason and is not scored (its stage is left to the upstream tag).
    assert errors[2] == rows[2]["error"] and stages[2] is None and scores[2] is None
    assert errors[3] == "empty prompt" and stages[3] == "clip_filter"
    assert (clip_filter.kept, clip_filter.dropped) == (1, 0)


def test_same_seed_same_scores_other_seed_other_scores(pairs):
    batch = _batch(pairs[:3])
    a = ClipFilter(ClipFilterConfig(threshold=-1.0, seed=1))(batch).column("clip_text_score").to_pylist()
    b = ClipFilter(ClipFilterConfig(threshold=-1.0, seed=1))(batch).column("clip_text_score").to_pylist()
    c = ClipFilter(ClipFilterConfig(threshold=-1.0, seed=2))(batch).column("clip_text_score").to_pylist()
    assert a == b and a != c

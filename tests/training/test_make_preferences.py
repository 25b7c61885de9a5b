"""Preference pairs: K samples per (prompt, style) from the SFT model, ranked by CLIP style + text scores."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from stylear_core.data.images import decode_image
from stylear_core.data.layout import ImageTokenLayout
from stylear_core.data.schemas import PREFERENCE_PAIRS_SCHEMA, validate_table
from stylear_core.inference.engine import decode_images
from stylear_core.preferences.pairs import (
    PreferencePairSampler,
    PreferenceSamplingConfig,
    synthetic_style_requests,
)
from stylear_core.runs import read_manifest


def as_numpy_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    out = {}
    for key in rows[0]:
        arr = np.empty(len(rows), dtype=object)
        arr[:] = [r[key] for r in rows]
        out[key] = arr
    return out


def test_sampler_picks_the_best_and_worst_scored_samples(model_cfg, sft_adapter, vocab):
    sampling = PreferenceSamplingConfig(
        num_samples=3, top_k=64, style_weight=1.0, text_weight=0.5, min_margin=-1.0
    )
    sampler = PreferencePairSampler(model_cfg, str(sft_adapter), sampling, device="cpu")
    requests = synthetic_style_requests(2, seed=5, size=model_cfg.image_size)
    table = sampler(as_numpy_batch(requests))
    validate_table(table, PREFERENCE_PAIRS_SCHEMA, allow_extra_columns=False)
    assert table.schema.metadata[b"schema_version"] == b"stylear.preference_pairs/1"
    assert table.column("id").to_pylist() == [r["id"] for r in requests]

    size = model_cfg.image_size
    layout = ImageTokenLayout.for_resolution(size, size, vocab)
    for row, request in zip(table.to_pylist(), requests):
        assert row["chosen_score"] >= row["rejected_score"] and row["chosen_seed"] != row["rejected_seed"]
        assert (np.asarray(row["prompt_ids"]) == vocab.style_placeholder).sum() == model_cfg.num_style_tokens
        # Rescore both picks from their tokens alone: the stored scores are theirs.
        tokens = torch.tensor([row["chosen_tokens"], row["rejected_tokens"]])
        images = decode_images(sampler.vqgan, layout, tokens)
        reference = decode_image(request["style_image"])
        style = sampler.scorer.image_similarity(images, [reference, reference])
        text = sampler.scorer.text_score(images, [request["prompt"]] * 2)
        score = style + 0.5 * text
        assert score.tolist() == pytest.approx([row["chosen_score"], row["rejected_score"]], abs=1e-5)
        assert style.tolist() == pytest.approx(
            [row["chosen_style_score"], row["rejected_style_score"]], abs=1e-5
        )
    # Seeds derive from the row ids: the same rows give the same pairs.
    again = sampler(as_numpy_batch(requests))
    assert again.column("chosen_tokens").to_pylist() == table.column("chosen_tokens").to_pylist()


@pytest.mark.usefixtures("ray_session")
def test_job_writes_pairs_through_ray_data(tmp_path, sft_adapter, job_runner):
    summary = job_runner(
        "make_preferences",
        tmp_path,
        f"sft_adapter={sft_adapter}",
        "synthetic_requests=4",
        "sampling.num_samples=2",
        "sampling.min_margin=-1.0",
    )
    out = tmp_path / "make_preferences"
    table = pq.read_table(out / "pairs")
    validate_table(table, PREFERENCE_PAIRS_SCHEMA)
    assert table.num_rows == summary["pairs"] == summary["requests"] == 4
    assert read_manifest(out)["status"] == "complete"
    assert (table.column("chosen_score").to_numpy() >= table.column("rejected_score").to_numpy()).all()

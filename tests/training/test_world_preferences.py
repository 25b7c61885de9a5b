"""Preference pairs in the miniature world: ranked by the palette scorer (colour-histogram similarity to
the reference, the palette judge's features), on training styles only."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from stylear_core.adapters.export_stage import ExportStageConfig
from stylear_core.config import load_config
from stylear_core.data.images import decode_image
from stylear_core.data.layout import ImageTokenLayout
from stylear_core.data.schemas import PREFERENCE_PAIRS_SCHEMA, validate_table
from stylear_core.data.synthetic import PALETTES, STROKES, TEXTURES, StyleSpec, render, sample_content
from stylear_core.inference.engine import decode_images
from stylear_core.miniature.data import HELD_OUT_STYLES, TRAIN_STYLES
from stylear_core.preferences.pairs import (
    PaletteStyleScorer,
    PreferencePairSampler,
    PreferenceSamplingConfig,
    world_style_requests,
)
from stylear_core.preferences.stage import PreferenceStageConfig
from stylear_core.training.stages import DPOTrainConfig

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"


def test_palette_scorer_ranks_the_references_palette_above_another():
    scorer = PaletteStyleScorer()
    rng = random.Random(3)
    same, other = [], []
    for palette in PALETTES:
        for rival in PALETTES:
            if rival == palette:
                continue
            reference = render(sample_content(rng, 1), StyleSpec(palette, TEXTURES[0], STROKES[0]), 64)
            content = sample_content(rng, 1)
            # The rival shares the reference's texture and stroke; the candidate shares only its palette
            # (on a two-colour background: gradient and noise ones spread mono's greys towards pastel's).
            candidate = render(content, StyleSpec(palette, TEXTURES[3], STROKES[1]), 64)
            rivalling = render(content, StyleSpec(rival, TEXTURES[0], STROKES[0]), 64)
            scores = scorer.image_similarity([candidate, rivalling, reference], [reference] * 3)
            same.append(float(scores[0]))
            other.append(float(scores[1]))
            assert float(scores[2]) == pytest.approx(1.0, abs=1e-5)  # an image against itself
            assert 0.0 <= float(scores[1]) <= 1.0
    assert all(s > o for s, o in zip(same, other)), list(zip(same, other))


def test_world_requests_draw_training_styles_only():
    rows = world_style_requests(200, seed=1)
    train = {s.style_id for s in TRAIN_STYLES}
    held = {s.style_id for s in HELD_OUT_STYLES}
    styles = {r["style_ref"] for r in rows}
    assert styles <= train and not styles & held and len(styles) > 40
    assert [r["id"] for r in rows] == [r["id"] for r in world_style_requests(200, seed=1)]
    assert world_style_requests(4, seed=2)[0]["style_image"] != rows[0]["style_image"]
    assert decode_image(rows[0]["style_image"]).size == (64, 64)


def test_world_configs_rank_by_palette_and_match_the_dpo_noise():
    prefs = load_config(PreferenceStageConfig, CONFIGS / "make_preferences" / "mini.yaml")
    dpo = load_config(DPOTrainConfig, CONFIGS / "train_dpo" / "mini.yaml")
    assert prefs.synthetic_set == "world" and prefs.sampling.style_scorer == "palette"
    # DPO reads the stored reference log-probs only at the strength they were scored at.
    assert prefs.reference_noise_strength == dpo.dpo.noise_strength
    # Everything else keeps CLIP.
    assert PreferenceSamplingConfig().style_scorer == "clip"
    tiny = load_config(PreferenceStageConfig, CONFIGS / "make_preferences" / "tiny.yaml")
    assert tiny.sampling.style_scorer == "clip" and tiny.synthetic_set == "procedural"


@pytest.mark.usefixtures("ray_session")
def test_stage_ranks_world_pairs_by_the_palette_scorer(tmp_path, model_cfg, sft_adapter, vocab, job_runner):
    job_runner(
        "make_preferences",
        tmp_path,
        f"sft_adapter={sft_adapter}",
        "synthetic_requests=3",
        "synthetic_set=world",
        "sampling.style_scorer=palette",
        "sampling.text_weight=0.0",
        "sampling.num_samples=3",
        "sampling.min_margin=-1.0",
    )
    table = pq.read_table(tmp_path / "make_preferences" / "pairs")
    validate_table(table, PREFERENCE_PAIRS_SCHEMA)
    requests = {r["id"]: r for r in world_style_requests(3, seed=1)}  # tiny.yaml's synthetic_seed
    assert sorted(table.column("id").to_pylist()) == sorted(requests)

    # Rescore both picks from their tokens: the stored style scores are the palette scorer's, not CLIP's.
    sampler = PreferencePairSampler(model_cfg, str(sft_adapter), PreferenceSamplingConfig(), "cpu", None)
    layout = ImageTokenLayout.for_resolution(model_cfg.image_size, model_cfg.image_size, vocab)
    scorer = PaletteStyleScorer()
    for row in table.to_pylist():
        request = requests[row["id"]]
        assert row["style_ref"] == request["style_ref"]
        images = decode_images(
            sampler.vqgan, layout, torch.tensor([row["chosen_tokens"], row["rejected_tokens"]])
        )
        reference = decode_image(request["style_image"])
        palette = scorer.image_similarity(images, [reference, reference])
        clip = sampler.scorer.image_similarity(images, [reference, reference])
        stored = [row["chosen_style_score"], row["rejected_style_score"]]
        assert palette.tolist() == pytest.approx(stored, abs=1e-5)
        assert clip.tolist() != pytest.approx(stored, abs=1e-3)
        # text_weight 0: the score is the style score alone.
        assert [row["chosen_score"], row["rejected_score"]] == pytest.approx(stored, abs=1e-6)
        assert row["chosen_score"] >= row["rejected_score"]


def test_demo_runs_dpo_on_its_sft_and_judges_it():
    from stylear_core.miniature.evaluate_stage import WorldEvalStageConfig
    from stylear_core.pipeline import PipelineConfig

    demo = load_config(PipelineConfig, CONFIGS / "pipeline" / "demo.yaml")
    order = list(demo.stages)
    assert order.index("train_style") < order.index("make_preferences") < order.index("train_dpo")
    assert order.index("train_dpo") < order.index("evaluate_world")

    def stage(name, cls):
        spec = demo.stages[name]
        run = ["run_dir=/r", f"output_dir=/r/{name}", *spec.overrides]
        return load_config(cls, CONFIGS.parent.parent / spec.config, run)

    prefs = stage("make_preferences", PreferenceStageConfig)
    dpo = stage("train_dpo", DPOTrainConfig)
    world = stage("evaluate_world", WorldEvalStageConfig)
    # Pairs from the demo's SFT, DPO on those pairs from that SFT, and the judged DPO adapter is its output.
    assert prefs.path(prefs.sft_adapter) == dpo.path(dpo.sft_adapter) == "/r/train_style/adapter"
    assert dpo.path(dpo.pairs) == "/r/make_preferences/pairs"
    assert world.path(world.adapters["dpo"]) == "/r/train_dpo/adapter"
    assert order.index("evaluate_world") < order.index("export")
    export = stage("export", ExportStageConfig)
    assert export.path(export.adapter) == "/r/train_dpo/adapter"  # the demo serves the DPO adapter
    assert prefs.reference_noise_strength == dpo.dpo.noise_strength

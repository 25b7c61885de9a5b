"""The miniature world's trained parts: held-out styles, VQGAN, style CLIP and judges learn, and are cached."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from stylear_core.data.images import to_tensor
from stylear_core.data.synthetic import ALL_STYLES
from stylear_core.miniature.data import HELD_OUT_STYLES, TRAIN_STYLES
from stylear_core.miniature.judges import (
    ColourPaletteJudge,
    JudgeTrainingConfig,
    judge_accuracy,
    procedural_images,
)
from stylear_core.miniature.style_clip import StyleClipTrainingConfig
from stylear_core.miniature.vqgan_training import VQGANTrainingConfig, psnr
from stylear_core.miniature.world import WorldConfig, ensure_world, load_judges, load_vqgan, world_paths
from stylear_core.models.config import ModelConfig
from stylear_core.models.presets import build_backbone, build_style_encoder, build_vqgan
from stylear_core.models.vqgan import mini_vqgan_config, random_vqgan


def test_held_out_styles_are_new_combinations_of_known_parts():
    assert len(HELD_OUT_STYLES) == 12 and len(set(HELD_OUT_STYLES)) == 12
    assert not set(HELD_OUT_STYLES) & set(TRAIN_STYLES)
    assert set(HELD_OUT_STYLES) | set(TRAIN_STYLES) == set(ALL_STYLES)
    for style in HELD_OUT_STYLES:
        for a, b in itertools.combinations(("palette", "texture", "stroke"), 2):
            seen = {(getattr(s, a), getattr(s, b)) for s in TRAIN_STYLES}
            assert (getattr(style, a), getattr(style, b)) in seen, (style, a, b)


def test_the_colour_palette_judge_names_held_out_palettes_and_not_shuffled_ones():
    judge = ColourPaletteJudge.fit()  # no VQGAN: drawn images only
    images, _, styles = procedural_images(4242, 120)
    pixels = to_tensor(images)
    assert judge.correct(pixels, styles).float().mean().item() >= 0.95
    # Each image against the next image's style, where that names another palette: a judge that did
    # not read colour would agree with these about as often as with the true ones.
    others = styles[1:] + styles[:1]
    differ = torch.tensor([a.palette != b.palette for a, b in zip(styles, others)])
    assert differ.sum() > 60
    assert judge.correct(pixels, others)[differ].float().mean().item() <= 0.05


def test_vqgan_training_turns_noise_into_reconstructions(cut_down_world):
    from stylear_core.miniature.world import WorldPaths, _random_images

    _, weights = _random_images(0, 64, "test-train")
    assert 1.0 < float(weights.mean()) < 4.0  # objects weigh more than the background
    # The cut-down world's VQGAN (this folder's conftest) against its random initialisation.
    published = cut_down_world.run_dir / "pretrain" / "model"
    trained, untrained = load_vqgan(WorldPaths(published)), random_vqgan(mini_vqgan_config(), seed=0)
    held = to_tensor(procedural_images(4242, 32)[0])
    with torch.no_grad():
        before = psnr(held, untrained.decode(untrained.encode(held)))
        codes = trained.encode(held)
        after = psnr(held, trained.decode(codes))
    assert after > before + 3.0, (before, after)
    assert codes.unique().numel() > 32  # the codebook stays in use (dead codes are restarted)
    stats = json.loads((published / "world.json").read_text())["vqgan_training"]
    assert stats["codes_used"] > 32 and stats["final_loss"] < stats["first_loss"], stats


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    config = WorldConfig(
        vq_images=128,
        vqgan=VQGANTrainingConfig(
            steps=40, crop=16, batch_size=16, warmup_steps=5, full_image_steps=10, full_image_batch_size=8
        ),
        style_clip=StyleClipTrainingConfig(steps=30, batch_size=32),
        judges=JudgeTrainingConfig(num_images=600, steps=150, batch_size=32),
        held_images=64,
    )
    logs: list[str] = []
    paths, report = ensure_world(config, cache, log=logs.append)
    return config, cache, paths, report, logs


def test_ensure_world_trains_measures_and_writes_loadable_parts(small_world):
    config, _, paths, report, logs = small_world
    assert any("training the VQGAN" in line for line in logs)
    assert json.loads(paths.report.read_text()) == report
    assert report["vqgan"]["latent_side"] == 8
    # Even a short run of the style judge reads held-out images far better than chance (1/90).
    assert report["judges"]["raw"]["style"] > 5 * report["judges"]["chance_style"]
    stats = report["style_encoder"]
    assert set(stats) >= {"random_tiny_clip", "trained_tiny_clip"}
    # The parts load through the mini preset, as the pipeline's later stages load them.
    cfg = ModelConfig(
        preset="mini", vqgan_ckpt=str(paths.vqgan_ckpt), vqgan_yaml=str(paths.vqgan_yaml),
        clip_checkpoint=str(paths.clip),
    )  # fmt: skip
    _, vocab = build_backbone(cfg)
    vq = build_vqgan(cfg, vocab)
    assert torch.equal(vq.quantize.embedding.weight, load_vqgan(paths).quantize.embedding.weight)
    encoder = build_style_encoder(cfg)
    random_encoder = build_style_encoder(ModelConfig(preset="mini"))
    assert not torch.equal(encoder.visual.conv1.weight, random_encoder.visual.conv1.weight)
    images, contents, styles = procedural_images(config.seed + 1000, config.held_images)
    reloaded = judge_accuracy(load_judges(paths), to_tensor(images), contents, styles)
    assert reloaded == report["judges"]["raw"]


def test_a_second_call_reuses_the_cached_world_and_a_new_config_does_not(small_world):
    config, cache, paths, report, _ = small_world
    logs: list[str] = []
    again_paths, again = ensure_world(config, cache, log=logs.append)
    assert again_paths == paths and again == report
    assert logs == [f"miniature world: reusing {paths.root}"]
    other = WorldConfig(seed=1)
    assert world_paths(cache, other).root != paths.root


def test_world_evaluation_judges_every_variant_on_the_held_out_pairs(small_world, ray_session, tmp_path):
    from PIL import Image

    from stylear_core.miniature.evaluate import WorldEvalConfig
    from stylear_core.miniature.evaluate_stage import WorldEvalStageConfig, run_world_evaluation

    _, _, paths, _, _ = small_world
    model = ModelConfig(
        preset="mini", image_size=64, vqgan_ckpt=str(paths.vqgan_ckpt), vqgan_yaml=str(paths.vqgan_yaml)
    )
    cfg = WorldEvalStageConfig(
        output_dir=str(tmp_path / "evaluate_world"),
        run_dir=str(tmp_path),
        world_dir=str(paths.root),
        adapters={"sft": str(tmp_path / "missing")},  # not trained: judged without it
        model=model,
        eval=WorldEvalConfig(prompts_per_style=1),
    )
    summary = run_world_evaluation(cfg)
    assert summary["variants"] == ["base"]
    base = summary["metrics"]["base"]
    assert base["pairs"] == len(HELD_OUT_STYLES)
    for key in ("style_accuracy", "content_accuracy", "leakage", "palette_colour_accuracy"):
        assert 0.0 <= base[key] <= 1.0
    grid = Image.open(summary["grid"])
    assert grid.size == (12 * 128, 2 * 128)  # references, then the base's images

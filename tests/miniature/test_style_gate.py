"""The method's quality gate: in a cut-down miniature world, StyleAR SFT (style tokens from the world's
style CLIP, resampler + LoRA trained on Ray Train + DeepSpeed) makes the pretrained base draw the palette
of style references it never saw in training, well above chance and well above the base given the same
references.

The world, the base and the SFT are the pipeline's own stages (``jobs.pretrain``, ``jobs.train_style``)
with fewer images and steps. Palette is the part of a style that a world this small carries through
its VQGAN, and it is read by :class:`ColourPaletteJudge`, which needs no training loop and is checked on
held-out drawn and VQ-decoded images first, so a failure here is the method's and not the judge's
(the full-size figures, texture and stroke included, are in the README).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from jobs import pretrain, train_style
from stylear_core.adapters.format import adapter_model_config
from stylear_core.data.images import to_tensor
from stylear_core.miniature.evaluate import WorldEvalConfig, generate_variant, held_out_pairs
from stylear_core.miniature.judges import ColourPaletteJudge, procedural_images, vq_round_trip
from stylear_core.miniature.world import WorldPaths, load_vqgan

pytestmark = pytest.mark.usefixtures("ray_session")

CUT_DOWN_WORLD = [
    "world.vq_images=512",
    "world.vqgan.steps=1000",
    "world.vqgan.batch_size=16",
    "world.vqgan.full_image_steps=300",
    "world.vqgan.full_image_batch_size=8",
    "world.vqgan.warmup_steps=20",
    "world.vqgan.lr=0.003",
    "world.style_clip.steps=100",
    "world.style_clip.batch_size=32",
    # The trained judges are not read here (the colour judge is); the stage still makes them.
    "world.judges.num_images=128",
    "world.judges.steps=10",
    "world.judges.batch_size=16",
    "world.held_images=32",
    "data.rows=2000",
    "data.sft_rows=1000",
    "train.max_steps=300",
    "train.micro_batch_size=16",
    "train.checkpoint_every=300",
    "ray.worker.cpus=2",
    "eval.prompts=4",
]
SFT = ["train.max_steps=300", "train.micro_batch_size=16", "train.checkpoint_every=300", "ray.worker.cpus=2"]
PALETTES = 6


@pytest.fixture(autouse=True)
def _train_controller_for_tiny_runs(monkeypatch):
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")


@contextmanager
def job_driver_threads():
    """Torch threads as a job's driver has them (every core), not the suite's one: the world's VQGAN, CLIP
    and judges train in the stage's own process, and their convolutions use both cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_sft_draws_the_palette_of_held_out_references(tmp_path):
    clock = time.perf_counter()
    run = [f"run_dir={tmp_path}"]
    with job_driver_threads():
        pretrain.main(["--config", "jobs/configs/pretrain/mini.yaml", *run, *CUT_DOWN_WORLD])
    t_pretrain = time.perf_counter() - clock
    train_style.main(["--config", "jobs/configs/train_style/mini.yaml", *run, *SFT])
    t_sft = time.perf_counter() - clock - t_pretrain

    vq = load_vqgan(WorldPaths(Path(tmp_path) / "pretrain" / "model"))
    judge = ColourPaletteJudge.fit(vq)
    drawn, _, styles = procedural_images(4242, 96)
    pixels = to_tensor(drawn)
    on_raw = judge.correct(pixels, styles).float().mean().item()
    on_decoded = judge.correct(vq_round_trip(vq, pixels), styles).float().mean().item()
    # This world's VQGAN (about 20 dB) blurs the light palettes (vivid, pastel, mono) towards each other,
    # so the judge is surer of drawn images than of decoded ones; both are far above chance (1/6).
    assert on_raw >= 0.9 and on_decoded >= 0.7, (on_raw, on_decoded)

    # Every held-out style three times (36 pairs); each reference shows another object elsewhere.
    cfg = WorldEvalConfig(prompts_per_style=3)
    pairs = held_out_pairs(cfg)
    adapter = Path(tmp_path) / "train_style" / "adapter"
    model = adapter_model_config(adapter, None)
    accuracy = {}
    for name, adapter_dir in (("base", None), ("sft", adapter)):
        images = generate_variant(model, adapter_dir, pairs, cfg.sampling, cfg.seed)
        right = judge.correct(to_tensor(images), [p.style for p in pairs])
        accuracy[name] = right.float().mean().item()
    t_all = time.perf_counter() - clock
    print(
        f"palette judge: raw {on_raw:.2f}, decoded {on_decoded:.2f}; palette accuracy on {len(pairs)} "
        f"held-out pairs: base {accuracy['base']:.2f}, SFT {accuracy['sft']:.2f} (chance {1 / PALETTES:.2f}); "
        f"pretrain {t_pretrain:.0f} s, SFT {t_sft:.0f} s, total {t_all:.0f} s"
    )
    # Calibration: base 0.11-0.19, SFT 0.53 in four runs (decoded-image judge 0.78-0.82, raw 0.96).
    assert accuracy["sft"] >= 2 / PALETTES, accuracy
    assert accuracy["sft"] >= accuracy["base"] + 0.2, accuracy

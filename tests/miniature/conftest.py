"""Shared pieces of the miniature-world tests: Ray Train settings for small runs, and the cut-down world
+ SFT (the pipeline's own ``jobs.pretrain`` and ``jobs.train_style`` with fewer images and steps), made
once per session: the quality gates judge it, and the VQGAN and pretrain-stage tests read what it
trained and published."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from stylear_core.miniature.subjects import SubjectJudge, SubjectJudgeConfig, train_subject_judge

# The smallest world the pretrain stage makes (seconds per part): for tests of plumbing, not quality.
SMALL_WORLD = [
    "world.vq_images=64",
    "world.vqgan.steps=20",
    "world.vqgan.crop=16",
    "world.vqgan.batch_size=16",
    "world.vqgan.full_image_steps=5",
    "world.vqgan.full_image_batch_size=4",
    "world.vqgan.warmup_steps=2",
    "world.style_clip.steps=5",
    "world.style_clip.batch_size=16",
    "world.judges.num_images=128",
    "world.judges.steps=20",
    "world.judges.batch_size=16",
    "world.held_images=16",
]


@pytest.fixture
def small_world() -> list[str]:
    """``key=value`` arguments of the pretrain stage for :data:`SMALL_WORLD`."""
    return list(SMALL_WORLD)


CUT_DOWN_WORLD = [
    "world.vq_images=512",
    "world.vqgan.steps=1000",
    "world.vqgan.batch_size=16",
    "world.vqgan.full_image_steps=300",
    "world.vqgan.full_image_batch_size=4",
    "world.vqgan.autoencoder_steps=300",
    "world.vqgan.warmup_steps=20",
    "world.vqgan.lr=0.003",
    "world.style_clip.steps=100",
    "world.style_clip.batch_size=32",
    # The trained judges are not read by the gates (the colour judge is); the stage still makes them.
    "world.judges.num_images=128",
    "world.judges.steps=10",
    "world.judges.batch_size=16",
    "world.held_images=32",
    "data.rows=2000",
    "data.sft_rows=1000",
    "train.max_steps=300",
    "train.micro_batch_size=16",
    "train.checkpoint_every=300",
    "train.log_every=20",
    "ray.worker.cpus=2",
    "eval.prompts=4",
]
SFT = ["train.max_steps=300", "train.micro_batch_size=16", "train.checkpoint_every=300", "ray.worker.cpus=2"]


@pytest.fixture(scope="session")
def cut_down_subject_judge_config() -> SubjectJudgeConfig:
    """The subject judge at about 10 s of training on one core (the full config is SubjectJudgeConfig())."""
    return SubjectJudgeConfig(num_images=2000, steps=500, batch_size=32, width=16)


@pytest.fixture(scope="session")
def cut_down_subject_judge(cut_down_subject_judge_config) -> SubjectJudge:
    """A subject judge of :func:`cut_down_subject_judge_config`, trained once per session (seeded by its
    config); tests only read it."""
    judge, _ = train_subject_judge(cut_down_subject_judge_config)
    return judge


def tiny_run_train_controller(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read by TorchTrainer.fit in this process and passed to its controller: reports every
    0.5 s (tiny steps are far shorter than the 2 s default), no preemption watcher, room for a slow start."""
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")


@pytest.fixture(autouse=True)
def _train_controller_for_tiny_runs(monkeypatch):
    tiny_run_train_controller(monkeypatch)


@contextmanager
def job_driver_threads():
    """Torch threads as the demo's pipeline job has them (every core, reserved with
    ``--entrypoint-num-cpus``), not the suite's one: the world's VQGAN, CLIP and judges train in the
    stage's own process, and their convolutions use both cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class CutDownWorld:
    """The cut-down world's run dir (``<run_dir>/pretrain``, ``<run_dir>/train_style``), the pretrain
    stage's arguments and summary, and the seconds each stage took."""

    run_dir: Path
    pretrain_argv: list[str]
    pretrain: dict
    seconds: dict[str, float]


@pytest.fixture(scope="session")
def cut_down_world(tmp_path_factory, ray_session) -> CutDownWorld:
    """The cut-down world and its SFT, trained once per session; tests only read it (a test that runs
    a further stage writes that stage under ``run_dir`` too)."""
    from jobs import pretrain, train_style

    run_dir = tmp_path_factory.mktemp("cut-down-world")
    run = [f"run_dir={run_dir}"]
    argv = ["--config", "jobs/configs/pretrain/mini.yaml", *run, *CUT_DOWN_WORLD]
    with pytest.MonkeyPatch.context() as monkeypatch:
        tiny_run_train_controller(monkeypatch)
        clock = time.perf_counter()
        with job_driver_threads():
            summary = pretrain.main(argv)
        seconds = {"pretrain": time.perf_counter() - clock}
        train_style.main(["--config", "jobs/configs/train_style/mini.yaml", *run, *SFT])
        seconds["sft"] = time.perf_counter() - clock - seconds["pretrain"]
    return CutDownWorld(run_dir, argv, summary, seconds)

"""Shared fixtures of the training tests: the tiny model block of the shipped configs, synthetic token
shards, a tiny SFT artefact and a tiny preference set, and a runner for the jobs."""

from __future__ import annotations

import importlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from stylear_core.config import load_config
from stylear_core.models.backbone import tiny_vocab
from stylear_core.models.presets import ModelConfig, tiny_vqgan_codebook_size
from stylear_core.testing.fixtures import tiny_adapter
from stylear_core.training.synthetic_shards import (
    synthetic_preference_table,
    write_synthetic_token_shards,
)

REPO = Path(__file__).resolve().parents[2]
TINY_VOCAB = tiny_vocab(codebook_size=tiny_vqgan_codebook_size())
CONFIGS = REPO / "jobs" / "configs"


def tiny_model_config() -> ModelConfig:
    """The model block of the shipped tiny SFT config."""
    job = importlib.import_module("jobs.train_style")
    return load_config(job.Config, CONFIGS / "train_style" / "tiny.yaml").model


def run_job(stage: str, run_dir: Path, *overrides: str) -> dict:
    """``jobs.<stage>.main`` on its tiny config, writing under ``run_dir/<stage>``."""
    job = importlib.import_module(f"jobs.{stage}")
    argv = [
        "--config",
        str(CONFIGS / stage / "tiny.yaml"),
        f"run_dir={run_dir}",
        f"output_dir={run_dir}/{stage}",
    ]
    return job.main([*argv, *overrides])


@pytest.fixture(autouse=True)
def _train_controller_for_tiny_runs(monkeypatch):
    # Read by TorchTrainer.fit in this process and passed to its controller. The controller takes a
    # report every 2 s by default, and tiny steps take far less; no spot-instance preemption to watch
    # here (one process fewer per run); on a busy 2-core machine starting 2 workers can pass 60 s.
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")


@pytest.fixture(scope="session")
def model_cfg() -> ModelConfig:
    return tiny_model_config()


@pytest.fixture(scope="session")
def vocab():
    """The tiny preset's token vocabulary."""
    return TINY_VOCAB


@pytest.fixture(scope="session")
def job_runner():
    """:func:`run_job`, for tests that run a job."""
    return run_job


@pytest.fixture(scope="session")
def token_shards(tmp_path_factory, model_cfg) -> Path:
    """32 synthetic token-shard rows (with an ``image`` column) in a parquet directory."""
    path = tmp_path_factory.mktemp("shards")
    write_synthetic_token_shards(path, model_cfg, 32)
    return path


@pytest.fixture(scope="session")
def sft_adapter(tmp_path_factory, model_cfg) -> Path:
    """An SFT artefact with non-trivial LoRA and resampler weights and a manifest naming the model block."""
    return tiny_adapter(tmp_path_factory.mktemp("sft") / "adapter", model_cfg, perturb=("lora",), seed=1)


@pytest.fixture(scope="session")
def preference_pairs(tmp_path_factory, model_cfg) -> Path:
    """16 preference rows: chosen = a synthetic image's tokens, rejected = random codes in the same layout."""
    path = tmp_path_factory.mktemp("pairs")
    pq.write_table(synthetic_preference_table(model_cfg, 16), path / "part-0.parquet")
    return path

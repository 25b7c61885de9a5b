"""The shared stage config: ``{run_dir}`` paths, one ``Resources`` block, and old resource keys still read."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from stylear_core.config import ConfigError, Resources, describe, from_dict, load_config
from stylear_core.stages import StageConfig, resolve_model_paths

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"

# stage -> (keys as configs spelled them before Resources, the same settings spelled now)
OLD_AND_NEW = {
    "evaluate": ({"cpus_per_variant": 3, "gpus_per_variant": 0.5}, {"resources": {"cpus": 3, "gpus": 0.5}}),
    "export": ({"cpus": 3, "gpus": 0.5}, {"resources": {"cpus": 3, "gpus": 0.5}}),
    "dreambooth": ({"cpus_per_subject": 3, "gpus_per_subject": 0.5}, {"resources": {"cpus": 3, "gpus": 0.5}}),
    "evaluate_subject": ({"cpus_per_task": 3, "gpus_per_task": 0.5}, {"resources": {"cpus": 3, "gpus": 0.5}}),
    "make_preferences": ({"cpus_per_actor": 3, "gpus_per_actor": 0.5}, {"resources": {"cpus": 3, "gpus": 0.5}}),
    "train_subject": (
        {"parity_cpus": 3, "parity_gpus": 0.5, "ray": {"address": "local", "use_gpu": True, "cpus_per_worker": 2}},
        {"parity_resources": {"cpus": 3, "gpus": 0.5}, "ray_address": "local", "ray": {"worker": {"cpus": 2, "gpus": 1}}},
    ),
    "train_style": (
        {"ray": {"address": "local", "use_gpu": False, "cpus_per_worker": 2}},
        {"ray_address": "local", "ray": {"worker": {"cpus": 2, "gpus": 0}}},
    ),
    "curate": (
        {"stylize_pool": {"num_gpus": 0.5, "num_cpus": 3, "batch_size": 2}},
        {"stylize_pool": {"resources": {"cpus": 3, "gpus": 0.5}, "batch_size": 2}},
    ),
    "proxy_generate": (
        {"generate_pool": {"num_cpus": 3}},
        {"generate_pool": {"resources": {"cpus": 3, "gpus": 0.0}}},
    ),
}  # fmt: skip


@pytest.mark.parametrize("stage", sorted(OLD_AND_NEW))
def test_old_resource_keys_read_as_the_resources_block(stage: str):
    config = importlib.import_module(f"jobs.{stage}").Config
    old, new = OLD_AND_NEW[stage]
    assert from_dict(config, old) == from_dict(config, new)
    assert any("old name of" in line for line in describe(config))


def test_an_old_key_alone_keeps_the_fields_other_defaults():
    dreambooth = importlib.import_module("jobs.dreambooth").Config
    # One GPU per subject by default: setting only the CPUs the old way must not drop it.
    assert from_dict(dreambooth, {"cpus_per_subject": 4}).resources == Resources(cpus=4, gpus=1.0)


def test_old_and_new_spelling_together_is_an_error():
    evaluate = importlib.import_module("jobs.evaluate").Config
    with pytest.raises(ConfigError, match=r"cpus_per_variant is the old name of resources\.cpus"):
        from_dict(evaluate, {"cpus_per_variant": 1, "resources": {"cpus": 2}})
    train = importlib.import_module("jobs.train_dpo").Config
    with pytest.raises(ConfigError, match=r"ray\.address is the old name of ray_address"):
        load_config(train, CONFIGS / "train_dpo" / "tiny.yaml", ["ray.address=local"])
    with pytest.raises(ConfigError, match=r"ray\.use_gpu: expected bool"):
        from_dict(train, {"ray": {"use_gpu": 1}})


def test_resources_are_not_negative():
    with pytest.raises(ConfigError, match="gpus: must be >= 0"):
        from_dict(Resources, {"gpus": -1})
    assert Resources(cpus=2, gpus=0.5).ray_options() == {"num_cpus": 2, "num_gpus": 0.5}


def test_stage_paths_fill_in_the_run_dir_and_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = StageConfig(output_dir="{run_dir}/stage", run_dir="runs/x")
    assert cfg.stage_dir == tmp_path / "runs" / "x" / "stage"
    assert cfg.path("{run_dir}/in") == str(tmp_path / "runs" / "x" / "in")
    assert cfg.path("") == ""  # empty means "none", not the working directory


def test_model_checkpoint_paths_may_name_the_run_dir(tmp_path):
    # The miniature pipeline points every stage's model block at what its pretrain stage wrote.
    from jobs.train_style import Config

    cfg = from_dict(
        Config,
        {
            "run_dir": str(tmp_path / "run"),
            "model": {
                "preset": "mini",
                "backbone_path": "{run_dir}/pretrain/model/base",
                "vqgan_yaml": "/abs/v.yaml",
            },
        },
    )
    resolve_model_paths(cfg)
    assert cfg.model.backbone_path == str((tmp_path / "run" / "pretrain" / "model" / "base").resolve())
    assert cfg.model.vqgan_yaml == "/abs/v.yaml"  # no {run_dir}: left as written
    assert cfg.model.vqgan_ckpt is None

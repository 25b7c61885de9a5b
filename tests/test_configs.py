"""Every shipped YAML loads into its job's config class; config errors name the key."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from stylear_core.config import ConfigError, load_config, option

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "jobs" / "configs"
SHIPPED = sorted(CONFIG_ROOT.glob("*/*.yaml"))


# Stages of the miniature world only (its pretraining, its judges, the Proxy-Tuning arms): they ship the
# mini preset.
MINIATURE_STAGES = {"pretrain", "evaluate_world", "proxy_arms"}


def test_every_stage_ships_tiny_and_lumina7b():
    stages = sorted(p.name for p in CONFIG_ROOT.iterdir() if p.is_dir())
    assert stages, "no job configs shipped"
    for stage in stages:
        names = {p.stem for p in (CONFIG_ROOT / stage).glob("*.yaml")}
        wanted = {"mini"} if stage in MINIATURE_STAGES else {"tiny", "lumina7b"}
        assert wanted <= names, f"{stage} lacks one of {wanted}: {names}"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_config_loads(path: Path):
    module = importlib.import_module(f"jobs.{path.parent.name}")
    cfg = load_config(module.Config, path)
    assert isinstance(cfg, module.Config)


@dataclass
class _Inner:
    lr: float = option(1e-4, "learning rate")
    stage: int = option(2, "ZeRO stage", choices=(2, 3))


@dataclass
class _Outer:
    name: str = option("x", "a name")
    train: _Inner = option(_Inner, "training block")
    tags: list[str] = option([], "tags")


def test_misspelt_key_is_named(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: a\ntrain:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"train\.lrr"):
        load_config(_Outer, bad)


def test_misspelt_key_in_a_shipped_config_is_rejected(tmp_path: Path):
    src = CONFIG_ROOT / "pipeline" / "tiny.yaml"
    bad = tmp_path / "tiny.yaml"
    bad.write_text(src.read_text() + "\nrun_dri: runs/x\n")
    with pytest.raises(ConfigError, match="run_dri"):
        load_config(importlib.import_module("jobs.pipeline").Config, bad)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("train.lr=fast", r"train\.lr: expected float"),
        ("train.stage=4", r"train\.stage: expected one of"),
        ("tags=notalist", r"tags: expected a list"),
        ("name=3", r"name: expected str"),
    ],
)
def test_wrong_types_are_named(override: str, match: str):
    with pytest.raises(ConfigError, match=match):
        load_config(_Outer, None, [override])


def test_overrides_apply_and_ints_widen_to_float():
    cfg = load_config(_Outer, None, ["train.lr=3", "tags=[a, b]", "train.stage=3"])
    assert cfg.train.lr == 3.0 and isinstance(cfg.train.lr, float)
    assert cfg.tags == ["a", "b"] and cfg.train.stage == 3
    assert _Outer().tags is not _Outer().tags  # mutable defaults are not shared

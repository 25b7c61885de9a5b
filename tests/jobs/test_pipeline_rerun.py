"""A pipeline rerun skips complete stages only up to the first stage that has work: every later stage may
read what that one rewrote (a demo run that gained the DPO stages must judge the new adapter), so it
runs again, forced over its complete manifest.

The stage runner is replaced by one that records each call and writes the stage's complete manifest, so
no stage trains; the pipeline attaches to the suite's real Ray session before the first stage with work.
"""

from __future__ import annotations

import pytest

from stylear_core import pipeline
from stylear_core.pipeline import PipelineConfig, StageSpec, run_pipeline
from stylear_core.runs import is_complete, write_manifest

STAGES = ("pretrain", "train_style", "make_preferences", "train_dpo", "evaluate_world", "export")


@pytest.fixture
def ran(monkeypatch, ray_session) -> list[tuple[str, bool]]:
    calls: list[tuple[str, bool]] = []

    def record(name: str, spec: StageSpec, run_dir: str, force: bool = False) -> dict:
        calls.append((name, force))
        write_manifest(f"{run_dir}/{name}", "test/1", status="complete", summary={"ran": True})
        return {"ran": True}

    monkeypatch.setattr(pipeline, "run_pipeline_stage", record)
    return calls


def config(tmp_path) -> PipelineConfig:
    stages = {name: StageSpec(job=name, config=f"jobs/configs/{name}/mini.yaml") for name in STAGES}
    return PipelineConfig(run_dir=str(tmp_path / "run"), stages=stages)


def test_stages_after_one_with_work_run_again_even_when_complete(tmp_path, ran):
    cfg = config(tmp_path)
    for name in ("pretrain", "train_style", "evaluate_world", "export"):  # an older demo run, no DPO stages
        write_manifest(f"{cfg.run_dir}/{name}", "test/1", status="complete", summary={"old": True})

    results = run_pipeline(cfg)

    assert ran == [
        ("make_preferences", False),
        ("train_dpo", False),
        ("evaluate_world", True),
        ("export", True),
    ]
    assert results["pretrain"] == results["train_style"] == {"old": True}  # skipped: their stored summary
    assert results["evaluate_world"] == results["export"] == {"ran": True}
    assert all(is_complete(f"{cfg.run_dir}/{name}") for name in STAGES)


def test_a_rerun_of_a_complete_run_skips_every_stage(tmp_path, ran):
    cfg = config(tmp_path)
    run_pipeline(cfg)
    assert ran == [(name, False) for name in STAGES]
    ran.clear()
    run_pipeline(cfg)
    assert ran == []

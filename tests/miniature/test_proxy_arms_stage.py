"""The proxy_arms stage on real Ray over a cut-down world with subjects: every arm of every subject set is
tuned, scored and reported, and the stage refuses a world without subjects. (The arms' quality needs the
full world; see the README's Proxy-Tuning section.)"""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from jobs import pretrain, proxy_arms
from stylear_core.evaluation.run_report import write_report
from stylear_core.miniature.proxy_arms_stage import ARM_TITLES

pytestmark = pytest.mark.usefixtures("ray_session")

# Added to the small world (conftest): subjects, and a base trained for a few steps.
SUBJECTS = [
    "world.subject_share=0.5",
    "world.subject_judge.num_images=256",
    "world.subject_judge.steps=20",
    "world.subject_judge.width=16",
    "world.supervisor.rows=128",
    "world.supervisor.steps=20",
    "world.supervisor.batch_size=16",
    "world.supervisor.width=16",
    "world.supervisor.text_dim=32",
    "data.rows=64",
    "data.sft_rows=8",
    "data.classmate_share=0.25",
    "train.max_steps=8",
    "train.micro_batch_size=8",
    "train.checkpoint_every=8",
    "train.log_every=4",
    "train.optimizer.warmup_steps=2",
    "ray.worker.cpus=1",
    "eval.prompts=2",
]
ARMS = [
    "arms.views=3",
    "arms.prompts_per_subject=9",
    "arms.dreambooth.steps=10",
    "arms.dreambooth.prior_rows=32",
    "arms.proxy_per_subject=6",
    "arms.proxy_draws_per_subject=18",
    "arms.ar_steps=4",
    "arms.ar_batch_size=4",
    "arms.lora_rank=4",
    "arms.ar_prior_rows=8",
    "arms.ar_prior_share=0.25",
    "resources.cpus=1",
]


def test_the_stage_tunes_scores_and_reports_every_arm_of_every_subject_set(tmp_path, small_world):
    run = [f"run_dir={tmp_path}"]
    world = [*small_world, *SUBJECTS]
    pretrain.main(
        ["--config", "jobs/configs/pretrain/proxy.yaml", *run, f"output_dir={tmp_path}/pretrain", *world]
    )
    # The stage reads the world the pretrain stage published, not its cache (which may live elsewhere).
    shutil.rmtree(tmp_path / ".cache")
    summary = proxy_arms.main(
        ["--config", "jobs/configs/proxy_arms/mini.yaml", *run, "subject_sets=[[robot],[robot,cat]]", *ARMS]
    )
    out = tmp_path / "proxy_arms"
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"robot", "robot+cat"} == set(summary["results"])
    arms = ["base", "supervisor_untuned", "a_supervisor", "b_direct", "b_augmented"]
    for name, result in results.items():
        kept = result["proxy_rows"]
        # Arm (c) and its noise control exist exactly when the subject judge kept some proxy images.
        expected = arms + (["c_proxy", "c_random_images"] if kept else [])
        assert list(result["results"]) == expected
        assert len(result["prompts"]) == 9 * len(name.split("+"))
        for scores in result["results"].values():
            assert 0.0 <= scores["fidelity_at_place"] <= scores["fidelity"] <= 1.0
            # Half the prompts ask for another object, half show the subject alone.
            assert None not in (
                scores["other_object"],
                scores["fidelity_alone"],
                scores["fidelity_with_other"],
            )
        # DreamBooth and AR tuning steps are per subject: the two-subject set tunes twice as long.
        subjects = len(name.split("+"))
        assert result["dreambooth"]["steps"] == 10 * subjects
        assert {arm: losses["steps"] for arm, losses in result["ar_losses"].items()} == dict.fromkeys(
            expected[3:], 4 * subjects
        )
        # Fidelity split by subject: every subject has as many prompts, so the split averages to the whole.
        per_subject = result["fidelity_per_subject"]
        assert list(per_subject) == expected
        for arm, shares in per_subject.items():
            assert list(shares) == name.split("+")
            assert sum(shares.values()) / len(shares) == pytest.approx(result["results"][arm]["fidelity"])
        assert 0 <= result["proxy_rows_with_other"] <= kept
        assert result["ar_prior_rows"] == 8  # prior preservation in the AR arms' batches
        assert set(result["proxy_rows_per_subject"]) == set(name.split("+"))
        assert sum(result["proxy_rows_per_subject"].values()) == kept
        assert all(0 <= n <= 6 for n in result["proxy_rows_per_subject"].values())
        # The gate's verdict on the student and on the noise control, with the weak-to-strong claim.
        # A set without a student is judged too, and fails: no proxy image kept is no weak-to-strong.
        assert list(result["gate"]) == (["c_proxy", "c_random_images"] if kept else ["c_proxy"])
        assert all(isinstance(m, list) for m in result["gate"].values())
        if not kept:
            assert result["gate"]["c_proxy"] == ["c_proxy was not tuned (no training pairs)"]
        assert result["weak_to_strong"] in (True, False, None)
        assert summary["gate"][name] == result["gate"]
        grid = Image.open(out / f"{name}.png")
        assert grid.height == len(expected) * 128 and grid.width == 9 * 128
    report = (out / "report.html").read_text()
    assert report.count("Fidelity per subject") == 1  # the two-subject set only
    for name, result in results.items():
        assert f"{name}.png" in report
        for arm in result["results"]:
            assert ARM_TITLES[arm] in report
    assert report.count("Weak-to-strong") == 2
    # The run's report (make demo-proxy writes it) carries the arms' section, its grids one directory down.
    run_report = write_report(tmp_path).read_text()
    assert "Proxy-Tuning in the miniature world" in run_report and "Weak-to-strong" in run_report
    for name in results:
        assert f"proxy_arms/{name}.png" in run_report
    # A rerun finds the stage complete and trains nothing.
    again = proxy_arms.main(["--config", "jobs/configs/proxy_arms/mini.yaml", *run, *ARMS])
    assert again["results"] == summary["results"]


def test_the_stage_refuses_a_world_without_subjects(tmp_path):
    manifest = {"status": "complete", "summary": {"model": {"preset": "mini"}}}
    (tmp_path / "pretrain" / "model").mkdir(parents=True)
    (tmp_path / "pretrain" / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "pretrain" / "model" / "world.json").write_text(json.dumps({"vqgan": {}}))
    with pytest.raises(ValueError, match="no subjects"):
        proxy_arms.main(
            ["--config", "jobs/configs/proxy_arms/mini.yaml", f"run_dir={tmp_path}", "ray_address=local"]
        )


def test_the_run_report_names_results_an_older_stage_wrote_instead_of_failing(tmp_path):
    world = tmp_path / "pretrain" / "model"
    world.mkdir(parents=True)
    (world / "world.json").write_text(json.dumps({"subjects": {}}))
    stage = tmp_path / "proxy_arms"
    stage.mkdir()
    manifest = {"status": "complete", "format": "stylear.proxy_arms/1", "summary": {"world": str(world)}}
    (stage / "manifest.json").write_text(json.dumps(manifest))
    (stage / "results.json").write_text(json.dumps({"robot": {"results": {}, "prompts": []}}))
    report = write_report(tmp_path).read_text()
    assert "written by an older version of the stage" in report and "force=true" in report
    assert "gate, proxy_kept_share" in report  # the keys it lacks are named

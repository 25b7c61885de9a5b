"""The tiny Proxy-Tuning pipeline under Ray: DreamBooth supervisors -> proxy data -> one AR subject adapter ->
the supervisor-vs-student metrics table, whose numbers are the metrics of the two models' images."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from jobs import evaluate_subject, pipeline
from stylear_core.config import load_config
from stylear_core.data.images import decode_image
from stylear_core.evaluation.metric_models import build_metric_models
from stylear_core.evaluation.metrics import subject_metrics
from stylear_core.evaluation.subject_eval import (
    MEAN_ROW,
    SUBJECT_EVAL_FORMAT,
    StudentGenerator,
    eval_prompts,
    image_path,
)
from stylear_core.proxy.families import load_supervisor
from stylear_core.proxy.supervisor import tuned_subjects
from stylear_core.runs import is_complete, read_manifest

# Whole Proxy-Tuning runs under Ray take minutes on 2 cores: `make test-all` runs them.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PIPELINE = REPO / "jobs" / "configs" / "pipeline" / "proxy_tuning.yaml"
EVAL_CONFIG = REPO / "jobs" / "configs" / "evaluate_subject" / "tiny.yaml"
STAGES = ("dreambooth", "proxy_generate", "train_subject", "evaluate_subject")


@pytest.fixture(scope="module")
def pipeline_run(ray_session, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("proxy-tuning")
    results = pipeline.main(["--config", str(PIPELINE), f"run_dir={run_dir}"])
    eval_cfg = load_config(evaluate_subject.Config, EVAL_CONFIG, [f"run_dir={run_dir}"])
    subjects = tuned_subjects(run_dir / "dreambooth", run_dir / "subjects")
    return run_dir, results, eval_cfg, subjects


def test_every_stage_completes_and_hands_its_output_to_the_next(pipeline_run):
    run_dir, results, _, _ = pipeline_run
    assert list(results) == list(STAGES)
    assert all(is_complete(run_dir / stage) for stage in STAGES)
    assert set(read_manifest(run_dir)["stages"]) == set(STAGES)
    assert results["dreambooth"]["errors"] == {}
    proxy = results["proxy_generate"]["subjects"]
    assert set(proxy) == {"mushroom", "robot"}
    for s in proxy.values():
        # Some images passed the subject / prompt filter and were tokenized; the rest were filtered.
        assert s["kept"] == s["tokens"] > 0 and s["kept"] + s["filtered"] + s["failed"] == s["requested"]
    assert sum(s["filtered"] for s in proxy.values()) > 0
    adapter = read_manifest(run_dir / "train_subject" / "adapter")
    assert adapter["kind"] == "subject"
    assert {(s["name"], s["identifier"]) for s in adapter["subjects"]} == {
        ("mushroom", "zwx"),
        ("robot", "sks"),
    }
    assert results["train_subject"]["rows_per_subject"] == {n: s["tokens"] for n, s in proxy.items()}
    assert is_complete(run_dir / "adapters" / "subjects")


def test_metrics_table_holds_both_models_per_subject_and_their_means(pipeline_run):
    run_dir, results, eval_cfg, _ = pipeline_run
    out = run_dir / "evaluate_subject"
    table = pq.read_table(out / "metrics.parquet").to_pylist()
    assert [(r["model"], r["subject"]) for r in table] == [
        (model, subject) for model in ("supervisor", "student") for subject in ("mushroom", "robot", MEAN_ROW)
    ]
    per_subject_images = len(eval_cfg.prompts) * eval_cfg.images_per_prompt
    for r in table:
        assert all(math.isfinite(r[m]) and -1.0 <= r[m] <= 1.0 for m in ("dino", "clip_i", "clip_t"))
        assert r["images"] == per_subject_images * (2 if r["subject"] == MEAN_ROW else 1)
    for model in ("supervisor", "student"):
        rows = [r for r in table if r["model"] == model]
        for m in ("dino", "clip_i", "clip_t"):
            assert rows[2][m] == pytest.approx((rows[0][m] + rows[1][m]) / 2)
            assert results["evaluate_subject"]["models"][model][m] == pytest.approx(rows[2][m])
    with (out / "metrics.csv").open() as f:
        assert [(r["model"], r["subject"]) for r in csv.DictReader(f)] == [
            (r["model"], r["subject"]) for r in table
        ]
    markdown = (out / "metrics.md").read_text()
    assert markdown.startswith("| model | subject | images | DINO | CLIP-I | CLIP-T |")
    assert f"| student | robot | {per_subject_images} | {table[4]['dino']:.4f} |" in markdown
    assert read_manifest(out)["format"] == SUBJECT_EVAL_FORMAT


def test_table_values_are_the_metrics_of_the_saved_images_of_each_model(pipeline_run):
    run_dir, _, eval_cfg, subjects = pipeline_run
    out = run_dir / "evaluate_subject"
    table = {(r["model"], r["subject"]): r for r in pq.read_table(out / "metrics.parquet").to_pylist()}
    prompts = eval_prompts(subjects, eval_cfg.prompts, eval_cfg.images_per_prompt, eval_cfg.seed)
    dino, clip = build_metric_models(eval_cfg.metrics)
    robot = subjects[1]
    references = [decode_image(Path(p).read_bytes()) for p in robot.image_paths]
    mine = [p for p in prompts if p.subject == "robot"]
    for model in ("supervisor", "student"):
        images = [decode_image(image_path(out, model, p).read_bytes()) for p in mine]
        assert all(im.size == (64, 64) for im in images)
        direct = subject_metrics(images, references, [p.plain_prompt for p in mine], dino, clip)
        assert direct == pytest.approx({m: table[(model, "robot")][m] for m in direct}, abs=1e-5)
    assert mine[0].prompt == "a sks robot on the beach" and mine[0].plain_prompt == "a robot on the beach"


def test_each_model_image_comes_from_that_model(pipeline_run):
    # Regenerated as the evaluation did (the supervisor per subject, the student all prompts in one batch).
    run_dir, _, eval_cfg, subjects = pipeline_run
    out = run_dir / "evaluate_subject"
    prompts = eval_prompts(subjects, eval_cfg.prompts, eval_cfg.images_per_prompt, eval_cfg.seed)
    robot = subjects[1]
    mine = [p for p in prompts if p.subject == "robot"]
    supervisor = load_supervisor("sdxl", robot.pretrained_dir, lora_dir=robot.lora_dir)
    expected = supervisor(
        prompt=[p.prompt for p in mine], height=64, width=64, num_inference_steps=2, guidance_scale=5.0,
        generator=[torch.Generator().manual_seed(p.seed) for p in mine],
    ).images  # fmt: skip
    for p, image in zip(mine, expected):
        assert np.array_equal(
            np.asarray(decode_image(image_path(out, "supervisor", p).read_bytes())), np.asarray(image)
        )
    student = StudentGenerator(run_dir / "train_subject" / "adapter", eval_cfg.student)
    assert {s["identifier"] for s in student.subjects} == {"sks", "zwx"}
    again = student.generate([p.prompt for p in prompts], [p.seed for p in prompts])
    for p, image in zip(prompts, again):
        assert np.array_equal(
            np.asarray(decode_image(image_path(out, "student", p).read_bytes())), np.asarray(image)
        )


def test_rerunning_the_pipeline_skips_every_finished_stage(pipeline_run):
    run_dir, results, _, _ = pipeline_run
    table = run_dir / "evaluate_subject" / "metrics.parquet"
    stamp = table.stat().st_mtime_ns
    assert pipeline.main(["--config", str(PIPELINE), f"run_dir={run_dir}"]) == results
    argv = ["--config", str(EVAL_CONFIG), f"run_dir={run_dir}", f"output_dir={run_dir}/evaluate_subject"]
    assert evaluate_subject.main(argv)["status"] == "skipped"
    assert table.stat().st_mtime_ns == stamp

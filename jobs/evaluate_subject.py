"""Proxy-Tuning evaluation: the DreamBooth supervisor vs the AR student on the same prompts, DreamBench metrics.

Takes the stage-1 LoRAs (``dreambooth_dir``), the stage-3 subject adapter (``adapter_dir``), the subject
sets (the real images the metrics compare against) and the prompt templates. Both models draw every
prompt ``images_per_prompt`` times with the same seeds (Ray tasks with ``gpus_per_task`` GPUs); DINO,
CLIP-I and CLIP-T are computed per model and subject. Gives ``<output_dir>/metrics.{parquet,csv,md}``,
``<output_dir>/images/<model>/<subject>/*.png`` and ``<output_dir>/manifest.json``. A finished
directory is skipped on rerun; an unfinished one generates only missing images.

    python -m jobs.evaluate_subject --config jobs/configs/evaluate_subject/tiny.yaml [key=value ...]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stylear_core.config import option, parse_job_args, to_dict
from stylear_core.evaluation.metric_models import SubjectMetricsConfig
from stylear_core.evaluation.subject_eval import (
    EVAL_FORMAT,
    StudentSamplingConfig,
    eval_prompts,
    markdown_table,
    run_subject_eval,
)
from stylear_core.proxy.prompts import DREAMBENCH_OBJECT_PROMPTS
from stylear_core.proxy.proxy_data import resolve_run_path
from stylear_core.proxy.supervisor import SupervisorConfig, resolve_supervisor, tuned_subjects
from stylear_core.ray_connection import connect_ray
from stylear_core.runs import is_complete, read_manifest, write_manifest


@dataclass
class Config:
    """Which subjects and models are compared, on which prompts, with which metric models and resources."""

    output_dir: str = option("runs/tiny/evaluate_subject", "stage output: metrics table, images, manifest")
    run_dir: str = option("runs/tiny", "the pipeline run; paths may say {run_dir}")
    ray_address: str = option(
        "auto",
        "Ray cluster: auto (RAY_ADDRESS, else the last `ray start` here), local (private instance) or host:port",
    )
    subjects_dir: str = option("{run_dir}/subjects", "subject sets: the real images metrics compare with")
    dreambooth_dir: str = option("{run_dir}/dreambooth", "stage-1 output: the supervisor LoRAs")
    adapter_dir: str = option("{run_dir}/train_subject/adapter", "stage-3 output: the AR student's adapter")
    subjects: list[str] = option([], "subjects to evaluate (empty: every subject stage 1 finished)")
    prompts: list[str] = option(
        list(DREAMBENCH_OBJECT_PROMPTS), "prompt templates ({identifier}, {class_noun})"
    )
    images_per_prompt: int = option(4, "images per prompt and model (seeds seed .. seed + n - 1)")
    seed: int = option(0, "first sampling seed (the same for both models)")
    supervisor: SupervisorConfig = option(SupervisorConfig, "the supervisor's sampling (base from stage 1)")
    student: StudentSamplingConfig = option(StudentSamplingConfig, "the AR student's sampling")
    metrics: SubjectMetricsConfig = option(SubjectMetricsConfig, "DINO and CLIP feature extractors")
    gpus_per_task: float = option(1.0, "GPUs per generation / scoring task (0 on CPU)")
    cpus_per_task: float = option(1.0, "CPUs per generation / scoring task")


def main(argv: list[str] | None = None) -> dict:
    """Run the evaluation (``--config FILE key=value ...``); gives ``{"models": {model: means}, "table": paths}``."""
    cfg = parse_job_args(Config, argv, __doc__)
    out = Path(resolve_run_path(cfg.output_dir, cfg.run_dir))
    if is_complete(out, EVAL_FORMAT):
        return {**(read_manifest(out) or {}).get("summary", {}), "status": "skipped"}
    subjects = tuned_subjects(
        resolve_run_path(cfg.dreambooth_dir, cfg.run_dir),
        resolve_run_path(cfg.subjects_dir, cfg.run_dir),
        cfg.subjects or None,
    )
    prompts = eval_prompts(subjects, cfg.prompts, cfg.images_per_prompt, cfg.seed)

    connect_ray(cfg.ray_address, log_prefix="[evaluate_subject]")
    result = run_subject_eval(
        subjects,
        resolve_supervisor(cfg.supervisor, subjects),
        resolve_run_path(cfg.adapter_dir, cfg.run_dir),
        prompts,
        cfg.student,
        cfg.metrics,
        out,
        num_gpus=cfg.gpus_per_task,
        num_cpus=cfg.cpus_per_task,
    )
    summary = {**{k: result[k] for k in ("models", "table", "images")}, "status": "complete"}
    write_manifest(
        out, EVAL_FORMAT, status="complete", config=to_dict(cfg), summary=summary, rows=result["rows"]
    )
    print(markdown_table(result["rows"]), flush=True)
    return summary


if __name__ == "__main__":
    main()

"""The Proxy-Tuning evaluation stage: the DreamBooth supervisor vs the AR student on the same prompts.

:func:`run_subject_evaluation` takes a :class:`SubjectEvalStageConfig`: the stage-1 LoRAs
(``dreambooth_dir``), the stage-3 subject adapter (``adapter_dir``), the subject sets (the real images the
metrics compare against) and the prompt templates. Both models draw every prompt ``images_per_prompt``
times with the same seeds (Ray tasks with ``resources`` each); DINO, CLIP-I and CLIP-T are computed per
model and subject (:func:`~stylear_core.evaluation.subject_eval.run_subject_eval`). It writes
``<output_dir>/metrics.{parquet,csv,md}``, ``<output_dir>/images/<model>/<subject>/*.png`` and the
manifest (with the metric rows); an unfinished directory generates only missing images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from stylear_core.config import Resources, option, to_dict
from stylear_core.evaluation.metric_models import SubjectMetricsConfig
from stylear_core.evaluation.subject_eval import (
    SUBJECT_EVAL_FORMAT,
    StudentSamplingConfig,
    eval_prompts,
    markdown_table,
    run_subject_eval,
)
from stylear_core.proxy.prompts import DREAMBENCH_OBJECT_PROMPTS
from stylear_core.proxy.supervisor import SupervisorConfig, resolve_supervisor, tuned_subjects
from stylear_core.runs import write_manifest
from stylear_core.stages import StageConfig


@dataclass
class SubjectEvalStageConfig(StageConfig):
    """Which subjects and models are compared, on which prompts, with which metric models and resources."""

    RENAMED_KEYS: ClassVar[dict] = {
        **StageConfig.RENAMED_KEYS,
        "gpus_per_task": "resources.gpus",
        "cpus_per_task": "resources.cpus",
    }

    output_dir: str = option("runs/tiny/evaluate_subject", "stage output: metrics table, images, manifest")
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
    resources: Resources = option(
        Resources(gpus=1.0), "CPUs and GPUs of each generation / scoring task (gpus 0 on CPU)"
    )


def run_subject_evaluation(cfg: SubjectEvalStageConfig) -> dict[str, Any]:
    """Generate, score and tabulate on the attached cluster; writes the manifest and returns the summary."""
    out = cfg.stage_dir
    subjects = tuned_subjects(cfg.path(cfg.dreambooth_dir), cfg.path(cfg.subjects_dir), cfg.subjects or None)
    prompts = eval_prompts(subjects, cfg.prompts, cfg.images_per_prompt, cfg.seed)
    result = run_subject_eval(
        subjects,
        resolve_supervisor(cfg.supervisor, subjects),
        cfg.path(cfg.adapter_dir),
        prompts,
        cfg.student,
        cfg.metrics,
        out,
        num_gpus=cfg.resources.gpus,
        num_cpus=cfg.resources.cpus,
    )
    summary = {**{k: result[k] for k in ("models", "table", "images")}, "status": "complete"}
    write_manifest(
        out, SUBJECT_EVAL_FORMAT, status="complete", config=to_dict(cfg), summary=summary, rows=result["rows"]
    )
    print(markdown_table(result["rows"]), flush=True)
    return summary


__all__ = ["SubjectEvalStageConfig", "run_subject_evaluation"]

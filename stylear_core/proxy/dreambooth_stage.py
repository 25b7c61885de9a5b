"""Stage 1 of Proxy-Tuning over every subject: a DreamBooth-LoRA Ray task per subject, and the manifest.

:func:`prepare_dreambooth` resolves the stage's paths and settles its inputs before Ray is needed (it
writes procedural subjects and a tiny random supervisor when the config asks, for the demo);
:func:`run_dreambooth_subjects` then trains every subject not yet complete as a Ray task
(:func:`~stylear_core.proxy.dreambooth.run_dreambooth_subject`), keeps the others' summaries, and
writes ``<output_dir>/manifest.json`` (format :data:`DREAMBOOTH_FORMAT`) listing the subjects. One
subject failing does not lose the others: the manifest is written (status failed) and the error raised.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from stylear_core.config import Resources, option, to_dict
from stylear_core.proxy.dreambooth import LORA_FORMAT, DreamBoothConfig, run_dreambooth_subject
from stylear_core.proxy.subjects import SUBJECT_FILE, SubjectSet, load_subject_sets, write_synthetic_subjects
from stylear_core.runs import is_complete, read_manifest, write_manifest
from stylear_core.stages import StageConfig

DREAMBOOTH_FORMAT = "stylear.dreambooth/1"


@dataclass
class DreamBoothStageConfig(StageConfig):
    """Where the subjects and supervisor are, how each subject trains, and what each Ray task holds."""

    RENAMED_KEYS: ClassVar[dict] = {
        **StageConfig.RENAMED_KEYS,
        "gpus_per_subject": "resources.gpus",
        "cpus_per_subject": "resources.cpus",
    }

    output_dir: str = option("runs/tiny/dreambooth", "stage output: <output_dir>/<subject>/ per subject")
    subjects_dir: str = option(
        "{run_dir}/subjects", "subject sets: <subjects_dir>/<name>/(*.png, subject.json)"
    )
    subjects: list[str] = option([], "subjects to tune (empty: every subject under subjects_dir)")
    identifiers: dict[str, str] = option({}, "per-subject identifier overrides, e.g. {robot: olis}")
    synthetic_subjects: int = option(
        0, "write this many procedural subjects to an empty subjects_dir first (demo)"
    )
    tiny_supervisor: bool = option(
        False, "write a tiny random supervisor to train.pretrained_dir if absent (demo)"
    )
    resources: Resources = option(Resources(gpus=1.0), "CPUs and GPUs of each subject's task (gpus 0 on CPU)")
    max_retries: int = option(1, "Ray retries of a subject task after a worker or node failure")
    train: DreamBoothConfig = option(DreamBoothConfig, "the DreamBooth LoRA recipe")


@dataclass
class DreamBoothPlan:
    """A prepared stage: its config, the recipe with absolute paths, the subjects and the output directory."""

    cfg: DreamBoothStageConfig
    train: DreamBoothConfig
    subjects: list[SubjectSet]
    output_dir: Path


def prepare_dreambooth(cfg: DreamBoothStageConfig) -> DreamBoothPlan:
    """Resolve ``cfg``'s paths (``{run_dir}``, made absolute: Ray workers need not share our cwd), write the
    demo's synthetic subjects / tiny supervisor when asked and absent, and read the subject sets."""
    train = replace(
        cfg.train,
        pretrained_dir=cfg.path(cfg.train.pretrained_dir),
        class_images_dir=cfg.path(cfg.train.class_images_dir),
    )
    subjects_dir = Path(cfg.path(cfg.subjects_dir))
    if cfg.synthetic_subjects and not any(subjects_dir.glob(f"*/{SUBJECT_FILE}")):
        write_synthetic_subjects(subjects_dir, cfg.synthetic_subjects, size=train.resolution)
    subjects = load_subject_sets(subjects_dir, cfg.subjects or None, cfg.identifiers)
    if cfg.tiny_supervisor and not (Path(train.pretrained_dir) / "model_index.json").is_file():
        from stylear_core.testing.tiny_pipelines import TINY_SUPERVISOR_BUILDERS

        TINY_SUPERVISOR_BUILDERS[train.preset](train.pretrained_dir, seed=train.seed)
    return DreamBoothPlan(cfg, train, subjects, cfg.stage_dir)


def run_dreambooth_subjects(
    plan: DreamBoothPlan, report: Callable[[str, str], None] = lambda name, status: None
) -> dict[str, Any]:
    """Train every subject of ``plan`` not yet complete as a Ray task (``ray.init`` first) and write the stage
    manifest; ``report(name, status)`` is called as each task finishes. Gives ``{"subjects", "errors"}``.

    Raises :class:`RuntimeError` naming the failed subjects after the manifest (status failed) is written.
    """
    import ray

    cfg, out = plan.cfg, plan.output_dir
    task = ray.remote(run_dreambooth_subject).options(
        **cfg.resources.ray_options(), max_retries=cfg.max_retries
    )
    pending = {
        s.name: task.remote(str(s.folder), plan.train, str(out / s.name), s.identifier)
        for s in plan.subjects
        if not is_complete(out / s.name, LORA_FORMAT)
    }
    results = {
        s.name: {**(read_manifest(out / s.name) or {}).get("summary", {}), "status": "skipped"}
        for s in plan.subjects
        if s.name not in pending
    }
    errors = {}
    for name, ref in pending.items():
        try:
            results[name] = ray.get(ref)
        except Exception as e:  # one subject failing must not lose the others' results
            errors[name] = f"{type(e).__name__}: {e}"
        report(name, results.get(name, {}).get("status", "failed"))
    summary = {"subjects": results, "errors": errors}
    write_manifest(
        out,
        DREAMBOOTH_FORMAT,
        status="failed" if errors else "complete",
        config=to_dict(cfg),
        summary=summary,
    )
    if errors:
        raise RuntimeError(f"DreamBooth failed for {sorted(errors)}: {errors}")
    return summary


def skipped_dreambooth_summary(stored: dict[str, Any]) -> dict[str, Any]:
    """A rerun of a finished stage: the stored summary, every subject marked ``skipped`` as a rerun marks it."""
    return {
        **stored,
        "subjects": {n: {**s, "status": "skipped"} for n, s in stored.get("subjects", {}).items()},
    }


def run_dreambooth_stage(cfg: DreamBoothStageConfig) -> dict[str, Any]:
    """The whole stage on the attached cluster: prepare, then train every unfinished subject, logging each."""

    def report(name: str, status: str) -> None:
        print(f"[dreambooth] {name}: {status}", flush=True)

    return run_dreambooth_subjects(prepare_dreambooth(cfg), report)


__all__ = [
    "DREAMBOOTH_FORMAT",
    "DreamBoothPlan",
    "DreamBoothStageConfig",
    "prepare_dreambooth",
    "run_dreambooth_stage",
    "run_dreambooth_subjects",
    "skipped_dreambooth_summary",
]

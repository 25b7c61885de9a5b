"""Stage 1 of Proxy-Tuning: DreamBooth-LoRA-tune the diffusion supervisor on every subject, in parallel.

Takes a folder of subject sets (``<subjects_dir>/<name>/{*.png, subject.json}``, see
:mod:`stylear_core.proxy.subjects`) and a local supervisor pipeline (SDXL or SD3). Runs one Ray task
per subject (``gpus_per_subject`` GPUs each) and gives ``<output_dir>/<subject>/`` with the LoRA
(``pytorch_lora_weights.safetensors``, loadable with ``pipe.load_lora_weights``) and a manifest, plus
``<output_dir>/manifest.json`` listing the subjects. Subjects already complete are skipped on rerun.

    python -m jobs.dreambooth --config jobs/configs/dreambooth/tiny.yaml [key=value ...]
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from stylear_core.config import option, parse_job_args, to_dict
from stylear_core.proxy.dreambooth import (
    LORA_FORMAT,
    TINY_SUPERVISOR_BUILDERS,
    DreamBoothConfig,
    run_dreambooth_subject,
)
from stylear_core.proxy.subjects import SUBJECT_FILE, load_subject_sets, write_synthetic_subjects
from stylear_core.ray_connection import connect_ray
from stylear_core.runs import is_complete, read_manifest, write_manifest

FORMAT = "stylear.dreambooth/1"


@dataclass
class Config:
    """Where the subjects and supervisor are, how each subject trains, and what each Ray task holds."""

    output_dir: str = option("runs/tiny/dreambooth", "stage output: <output_dir>/<subject>/ per subject")
    run_dir: str = option(
        "runs/tiny", "the pipeline run this stage belongs to; any path here may say {run_dir}"
    )
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
    gpus_per_subject: float = option(1.0, "GPUs per subject task (0 on CPU)")
    cpus_per_subject: float = option(1.0, "CPUs per subject task")
    max_retries: int = option(1, "Ray retries of a subject task after a worker or node failure")
    ray_address: str = option(
        "auto",
        "Ray cluster: auto (RAY_ADDRESS, else the last `ray start` here), local (private instance) or host:port",
    )
    train: DreamBoothConfig = option(DreamBoothConfig, "the DreamBooth LoRA recipe")


def main(argv: list[str] | None = None) -> dict:
    """Run the stage (``--config FILE key=value ...``); gives ``{"subjects": {...}, "errors": {...}}``."""
    cfg = parse_job_args(Config, argv, __doc__)
    import ray

    # Paths may say {run_dir}; they are made absolute because Ray workers need not share our cwd.
    def resolve(path: str) -> str:
        return str(Path(path.format(run_dir=cfg.run_dir)).resolve()) if path else path

    train = replace(
        cfg.train,
        pretrained_dir=resolve(cfg.train.pretrained_dir),
        class_images_dir=resolve(cfg.train.class_images_dir),
    )
    subjects_dir = Path(resolve(cfg.subjects_dir))
    if cfg.synthetic_subjects and not any(subjects_dir.glob(f"*/{SUBJECT_FILE}")):
        write_synthetic_subjects(subjects_dir, cfg.synthetic_subjects, size=train.resolution)
    subjects = load_subject_sets(subjects_dir, cfg.subjects or None, cfg.identifiers)
    if cfg.tiny_supervisor and not (Path(train.pretrained_dir) / "model_index.json").is_file():
        TINY_SUPERVISOR_BUILDERS[train.preset](train.pretrained_dir, seed=train.seed)
    connect_ray(cfg.ray_address, log_prefix="[dreambooth]")

    out = Path(resolve(cfg.output_dir))
    task = ray.remote(run_dreambooth_subject).options(
        num_gpus=cfg.gpus_per_subject, num_cpus=cfg.cpus_per_subject, max_retries=cfg.max_retries
    )
    pending = {
        s.name: task.remote(str(s.folder), train, str(out / s.name), s.identifier)
        for s in subjects
        if not is_complete(out / s.name, LORA_FORMAT)
    }
    results = {
        s.name: {**(read_manifest(out / s.name) or {}).get("summary", {}), "status": "skipped"}
        for s in subjects
        if s.name not in pending
    }
    errors = {}
    for name, ref in pending.items():
        try:
            results[name] = ray.get(ref)
        except Exception as e:  # one subject failing must not lose the others' results
            errors[name] = f"{type(e).__name__}: {e}"
        print(f"[dreambooth] {name}: {results.get(name, {}).get('status', 'failed')}", flush=True)
    summary = {"subjects": results, "errors": errors}
    write_manifest(
        out, FORMAT, status="failed" if errors else "complete", config=to_dict(cfg), summary=summary
    )
    if errors:
        raise RuntimeError(f"DreamBooth failed for {sorted(errors)}: {errors}")
    return summary


if __name__ == "__main__":
    main()

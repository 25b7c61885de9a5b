"""One stage convention: a :class:`StageConfig` base and :func:`run_stage`, which every ``jobs/<stage>.py`` calls.

A stage reads its inputs and writes ``<output_dir>/`` with a ``manifest.json``
(:mod:`stylear_core.runs`); it is finished exactly when that manifest says ``status: complete`` in
the stage's format. :func:`run_stage` does the part every stage shares:

1. parse ``--config FILE key=value ...`` into the stage's config (:func:`~stylear_core.config.parse_job_args`);
2. skip a finished stage: a complete manifest of the stage's format in ``output_dir`` returns its
   summary (``status: skipped``) without attaching to Ray or touching a file (``force=true`` runs it
   anyway; stages that resume then do only the missing work);
3. attach to the stage's Ray cluster (:func:`~stylear_core.ray_connection.connect_ray`);
4. run the stage's library code, write the manifest (``status: complete``, the config, the summary)
   unless that code writes its own richer one, and print the summary.

Paths in a stage config may say ``{run_dir}``; :meth:`StageConfig.path` fills it in and makes the path
absolute, because Ray workers need not share the driver's working directory.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from stylear_core.config import option, parse_job_args, to_dict
from stylear_core.ray_connection import connect_ray
from stylear_core.runs import is_complete, read_manifest, write_manifest

RAY_ADDRESS_HELP = (
    "Ray cluster: auto (RAY_ADDRESS, else the last `ray start` here), local (private instance) or host:port"
)

C = TypeVar("C", bound="StageConfig")


def resolve_run_path(path: str, run_dir: str | Path) -> str:
    """``path`` with ``{run_dir}`` filled in, made absolute; an empty path stays empty (meaning "none")."""
    return str(Path(path.format(run_dir=run_dir)).resolve()) if path else path


@dataclass
class StageConfig:
    """What every stage config has: its output directory, the pipeline run, the Ray cluster, ``force``.

    A stage's config extends this class and redeclares ``output_dir`` with its own default.
    """

    # Training stages named their cluster ``ray.address``; the old key is still read.
    RENAMED_KEYS: ClassVar[dict] = {"ray.address": "ray_address"}

    output_dir: str = option("runs/tiny/stage", "stage output directory (may say {run_dir})")
    run_dir: str = option("runs/tiny", "the pipeline run; paths may say {run_dir}")
    ray_address: str = option("auto", RAY_ADDRESS_HELP)
    force: bool = option(False, "run even when output_dir already holds this stage's complete manifest")

    def path(self, template: str) -> str:
        """``template`` with ``{run_dir}`` filled in, absolute ('' stays '')."""
        return resolve_run_path(template, self.run_dir)

    @property
    def stage_dir(self) -> Path:
        """The stage's output directory, resolved."""
        return Path(self.path(self.output_dir))


MODEL_PATH_FIELDS = (
    "backbone_path",
    "tokenizer_path",
    "vqgan_ckpt",
    "vqgan_yaml",
    "clip_checkpoint",
    "stylear_release",
)


def resolve_model_paths(cfg: StageConfig) -> None:
    """Fill ``{run_dir}`` into the checkpoint paths of the stage's ``model`` block (when it has one), in place:
    the miniature pipeline points them at what its ``pretrain`` stage wrote under the run."""
    model = getattr(cfg, "model", None)
    for name in MODEL_PATH_FIELDS:
        value = getattr(model, name, None)
        if isinstance(value, str) and "{run_dir}" in value:
            setattr(model, name, cfg.path(value))


def skipped_summary(directory: str | Path) -> dict[str, Any]:
    """The summary a finished stage's manifest holds, marked ``status: skipped``."""
    return {**(read_manifest(directory) or {}).get("summary", {}), "status": "skipped"}


def threads_note() -> str:
    """How many threads torch computes on in this process, with a hint when that is one of several cores.

    Ray starts a job's entrypoint with ``OMP_NUM_THREADS=1`` unless it reserves CPUs
    (``ray job submit --entrypoint-num-cpus N``); a stage that trains or samples in its own process
    (the miniature world, evaluation) then runs on one core.
    """
    threads, cores = torch.get_num_threads(), len(os.sched_getaffinity(0))
    note = f"torch threads in this process: {threads} of {cores} cores"
    if threads == 1 and cores > 1:
        note += " (a Ray job's entrypoint gets one unless submitted with --entrypoint-num-cpus N)"
    return note


def run_stage(
    config_cls: type[C],
    run: Callable[[C], Mapping[str, Any]],
    argv: Sequence[str] | None,
    *,
    name: str,
    fmt: str,
    description: str | None = None,
    writes_manifest: bool = False,
    summary_lines: Callable[[Mapping[str, Any]], list[str]] | None = None,
    on_skip: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run the stage ``name`` from ``argv`` (see the module docstring); returns its summary.

    ``run(cfg)`` does the stage's work on the attached cluster and returns the summary. With
    ``writes_manifest`` it writes the complete manifest of format ``fmt`` itself (with fields of its
    own); otherwise :func:`run_stage` writes it. ``summary_lines`` renders the summary for the log
    (default: one line); ``on_skip`` turns a skipped stage's stored summary into what is returned.
    """
    cfg = parse_job_args(config_cls, argv, description or config_cls.__doc__ or name)
    resolve_model_paths(cfg)
    out = cfg.stage_dir
    if not cfg.force and is_complete(out, fmt):
        summary = skipped_summary(out)
        print(f"[{name}] {out}: complete, skipped", flush=True)
        return on_skip(summary) if on_skip else summary
    connect_ray(cfg.ray_address, log_prefix=f"[{name}]")
    print(f"[{name}] {threads_note()}", flush=True)
    summary = dict(run(cfg))
    if not writes_manifest:
        write_manifest(out, fmt, status="complete", config=to_dict(cfg), summary=summary)
    for line in summary_lines(summary) if summary_lines else [str(summary)]:
        print(f"[{name}] {line}", flush=True)
    return summary


__all__ = [
    "RAY_ADDRESS_HELP",
    "StageConfig",
    "resolve_model_paths",
    "resolve_run_path",
    "run_stage",
    "skipped_summary",
    "threads_note",
]

"""A pipeline run: stages in order under one run directory, each ``jobs/<stage>.py`` with its own config.

:func:`run_pipeline` takes a :class:`PipelineConfig` (the run dir, the stages and each stage's config
file plus overrides). Every stage writes ``<run_dir>/<stage>/`` with its manifest; a stage whose
manifest says complete is skipped (its stored summary is its result) unless an earlier stage of this
run had work to do: a later stage may read what that one rewrote, so from the first stage that runs on,
every stage runs (``force=true``). Ray is attached only when a stage has work to do.
``<run_dir>/manifest.json`` lists the stages' results.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from stylear_core.config import option, to_dict
from stylear_core.ray_connection import connect_ray
from stylear_core.runs import is_complete, read_manifest, write_manifest
from stylear_core.stages import RAY_ADDRESS_HELP

PIPELINE_FORMAT = "stylear.pipeline/1"


class UnknownStageError(ValueError):
    """A requested stage is not one of the pipeline's; the message lists them."""


@dataclass
class StageSpec:
    """One stage of a pipeline: which job module runs it, with which config."""

    job: str = option(help="job module under jobs/, e.g. curate")
    config: str = option(help="path of the stage's YAML config, relative to the repo root")
    overrides: list[str] = option([], help="key=value overrides for the stage's config")


@dataclass
class PipelineConfig:
    """The stages of one pipeline run and where it writes."""

    run_dir: str = option("runs/tiny", help="directory every stage writes under (<run_dir>/<stage>)")
    stages: dict[str, StageSpec] = option({}, help="stage name -> spec, run in this order")
    ray_address: str = option("auto", help=RAY_ADDRESS_HELP)


def run_pipeline_stage(name: str, spec: StageSpec, run_dir: str, force: bool = False) -> dict[str, Any]:
    """Import ``jobs.<spec.job>`` and call its ``main`` with the stage's config, writing under run_dir/name
    (``force``: even over a complete manifest)."""
    module = importlib.import_module(f"jobs.{spec.job}")
    argv = ["--config", spec.config, f"output_dir={run_dir}/{name}", f"run_dir={run_dir}", *spec.overrides]
    return module.main([*argv, "force=true"] if force else argv) or {}


def run_pipeline(cfg: PipelineConfig, stages: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Run ``stages`` (default: all of ``cfg``'s, in order), skipping complete ones; returns each one's result."""
    wanted = list(stages) if stages else list(cfg.stages)
    unknown = [s for s in wanted if s not in cfg.stages]
    if unknown:
        raise UnknownStageError(f"unknown stage(s) {unknown}; this pipeline has {list(cfg.stages)}")
    results: dict[str, dict[str, Any]] = {}
    upstream_ran = False  # a stage of this run had work: every later one may read what it rewrote
    for name in wanted:
        out = f"{cfg.run_dir}/{name}"
        complete = is_complete(out)
        if complete and not upstream_ran:
            print(f"[pipeline] {name}: complete, skipped", flush=True)
            results[name] = (read_manifest(out) or {}).get("summary", {})
            continue
        # Attached once, before the first stage with work: every stage then runs on this cluster.
        connect_ray(cfg.ray_address, log_prefix="[pipeline]")
        t0 = time.time()
        why = " (complete, but an earlier stage ran)" if complete else ""
        print(f"[pipeline] {name}: running{why}", flush=True)
        results[name] = run_pipeline_stage(name, cfg.stages[name], cfg.run_dir, force=complete)
        upstream_ran = True
        print(f"[pipeline] {name}: done in {time.time() - t0:.1f}s", flush=True)
    write_manifest(cfg.run_dir, PIPELINE_FORMAT, status="complete", config=to_dict(cfg), stages=results)
    return results


__all__ = [
    "PIPELINE_FORMAT",
    "PipelineConfig",
    "StageSpec",
    "UnknownStageError",
    "run_pipeline",
    "run_pipeline_stage",
]

"""Run pipeline stages in order under one run directory; finished stages are skipped on rerun.

Takes a pipeline config (``jobs/configs/pipeline/*.yaml``): the run dir, the stages and each
stage's config file plus overrides. Gives ``<run_dir>/<stage>/`` per stage, each with a manifest,
and ``<run_dir>/manifest.json`` listing the stages' results.

    python -m jobs.pipeline --config jobs/configs/pipeline/tiny.yaml [--stages a,b] [key=value ...]
"""

from __future__ import annotations

import argparse
import importlib
import time
from dataclasses import dataclass

from stylear_core.config import load_config, option, to_dict
from stylear_core.ray_connection import connect_ray
from stylear_core.runs import is_complete, read_manifest, write_manifest


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
    ray_address: str = option(
        "auto", help="Ray cluster to attach to: 'auto' (job submit), 'local' or host:port"
    )


Config = PipelineConfig


def run_stage(name: str, spec: StageSpec, run_dir: str) -> dict:
    """Import ``jobs.<spec.job>`` and call its ``main`` with the stage's config, writing under run_dir/name."""
    module = importlib.import_module(f"jobs.{spec.job}")
    argv = ["--config", spec.config, f"output_dir={run_dir}/{name}", f"run_dir={run_dir}", *spec.overrides]
    return module.main(argv) or {}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--stages", default=None, help="comma-separated subset of the config's stages")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(PipelineConfig, args.config, args.overrides)
    wanted = args.stages.split(",") if args.stages else list(cfg.stages)
    unknown = [s for s in wanted if s not in cfg.stages]
    if unknown:
        raise SystemExit(f"unknown stage(s) {unknown}; this pipeline has {list(cfg.stages)}")

    connect_ray(cfg.ray_address, log_prefix="[pipeline]")
    results: dict[str, dict] = {}
    for name in wanted:
        out = f"{cfg.run_dir}/{name}"
        if is_complete(out):
            print(f"[pipeline] {name}: complete, skipped", flush=True)
            results[name] = (read_manifest(out) or {}).get("summary", {})
            continue
        t0 = time.time()
        print(f"[pipeline] {name}: running", flush=True)
        results[name] = run_stage(name, cfg.stages[name], cfg.run_dir)
        print(f"[pipeline] {name}: done in {time.time() - t0:.1f}s", flush=True)
    write_manifest(cfg.run_dir, "stylear.pipeline/1", status="complete", config=to_dict(cfg), stages=results)
    return results


if __name__ == "__main__":
    main()

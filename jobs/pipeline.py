"""Run pipeline stages in order under one run directory; finished stages are skipped on rerun.

Takes a pipeline config (``jobs/configs/pipeline/*.yaml``): the run dir, the stages and each
stage's config file plus overrides. Gives ``<run_dir>/<stage>/`` per stage, each with a manifest,
and ``<run_dir>/manifest.json`` listing the stages' results (see :mod:`stylear_core.pipeline`).

    python -m jobs.pipeline --config jobs/configs/pipeline/tiny.yaml [--stages a,b] [key=value ...]
"""

from __future__ import annotations

import argparse

from stylear_core.config import load_config
from stylear_core.pipeline import PipelineConfig, StageSpec, UnknownStageError, run_pipeline

Config = PipelineConfig
__all__ = ["Config", "PipelineConfig", "StageSpec", "main"]


def main(argv: list[str] | None = None) -> dict:
    """Run the pipeline (``--config FILE [--stages a,b] key=value ...``); returns each stage's result."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--stages", default=None, help="comma-separated subset of the config's stages")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(PipelineConfig, args.config, args.overrides)
    try:
        return run_pipeline(cfg, args.stages.split(",") if args.stages else None)
    except UnknownStageError as e:
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main()

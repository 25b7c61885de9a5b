"""Proxy-Tuning evaluation: the DreamBooth supervisor vs the AR student on the same prompts, DreamBench metrics.

Takes the stage-1 LoRAs (``dreambooth_dir``), the stage-3 subject adapter (``adapter_dir``), the subject
sets (the real images the metrics compare against) and the prompt templates. Both models draw every
prompt ``images_per_prompt`` times with the same seeds (Ray tasks with ``resources`` each); DINO,
CLIP-I and CLIP-T are computed per model and subject. Gives ``<output_dir>/metrics.{parquet,csv,md}``,
``<output_dir>/images/<model>/<subject>/*.png`` and ``<output_dir>/manifest.json``. A finished
directory is skipped on rerun; an unfinished one generates only missing images.

    python -m jobs.evaluate_subject --config jobs/configs/evaluate_subject/tiny.yaml [key=value ...]
"""

from __future__ import annotations

from stylear_core.evaluation.subject_eval import SUBJECT_EVAL_FORMAT
from stylear_core.evaluation.subject_stage import SubjectEvalStageConfig, run_subject_evaluation
from stylear_core.stages import run_stage

FORMAT = SUBJECT_EVAL_FORMAT
Config = SubjectEvalStageConfig


def main(argv: list[str] | None = None) -> dict:
    """Run the evaluation (``--config FILE key=value ...``); gives ``{"models": {model: means}, "table": paths}``."""
    return run_stage(
        Config, run_subject_evaluation, argv, name="evaluate_subject", fmt=FORMAT, description=__doc__,
        writes_manifest=True, summary_lines=lambda summary: [],
    )  # fmt: skip


if __name__ == "__main__":
    main()

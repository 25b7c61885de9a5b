"""Style evaluation of the tuned adapters against the untuned base model, and the run's report.html.

Takes held (prompt, style reference) pairs (procedural, a seed the training data does not use), the
model block (default: the one in the ``tuned`` adapter's manifest) and ``adapters`` (variant name ->
adapter dir). Every variant -- ``base`` plus each adapter -- generates and scores the pairs in its own
Ray task (see :mod:`stylear_core.evaluation.style_stage`). Gives ``<output_dir>/{samples,metrics}.parquet``,
``metrics.json``, the sample and reference PNGs, ``manifest.json``, and ``<run_dir>/report.html``.
A complete output dir (manifest complete) is skipped on rerun (``force=true`` runs it anyway).

    python -m jobs.evaluate --config jobs/configs/evaluate/tiny.yaml [key=value ...]
"""

from __future__ import annotations

from stylear_core.evaluation.style_eval import EVALUATE_FORMAT
from stylear_core.evaluation.style_stage import StyleEvalStageConfig, run_style_evaluation
from stylear_core.stages import run_stage

FORMAT = EVALUATE_FORMAT
Config = StyleEvalStageConfig


def main(argv: list[str] | None = None) -> dict:
    """Run the stage (``--config FILE key=value ...``); returns the headline (tuned vs base scores)."""
    return run_stage(
        Config, run_style_evaluation, argv, name="evaluate", fmt=FORMAT, description=__doc__,
        writes_manifest=True,
    )  # fmt: skip


if __name__ == "__main__":
    main()

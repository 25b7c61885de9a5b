"""Judge the base, SFT and DPO models in the miniature world: style accuracy, content accuracy, leakage.

Takes the pretrain stage's published world (its judges), the adapters to compare with the base and the
held-out pairs (``jobs/configs/evaluate_world/mini.yaml``, see
:class:`~stylear_core.miniature.evaluate_stage.WorldEvalStageConfig`). Every variant runs in its own Ray
task. Gives ``<output_dir>/metrics.json``, ``<output_dir>/grid.png`` and ``<output_dir>/manifest.json``.

    python -m jobs.evaluate_world --config jobs/configs/evaluate_world/mini.yaml [key=value ...]
"""

from __future__ import annotations

from stylear_core.miniature.evaluate_stage import (
    EVALUATE_WORLD_FORMAT,
    WorldEvalStageConfig,
    run_world_evaluation,
)
from stylear_core.stages import run_stage

Config = WorldEvalStageConfig
FORMAT = EVALUATE_WORLD_FORMAT


def main(argv: list[str] | None = None) -> dict:
    """Run the stage (``--config FILE key=value ...``); returns the summary."""
    return run_stage(
        Config, run_world_evaluation, argv, name="evaluate_world", fmt=FORMAT, description=__doc__
    )


if __name__ == "__main__":
    main()

"""Preference pairs for DPO: sample K images per held (prompt, style reference) with the SFT model, rank by CLIP
(or by colour-palette similarity to the reference, ``sampling.style_scorer: palette``, in the miniature world).

Takes the SFT artefact (``sft_adapter``; its manifest names the model block unless ``model`` is set)
and request rows (``requests``: parquet with ``id, prompt, style_image`` and optionally
``style_ref``; or ``synthetic_requests`` procedural rows). Runs the sampler as Ray Data actors and
gives ``<output_dir>/pairs/*.parquet`` (``stylear.preference_pairs/1``: prompt, style, chosen and
rejected tokens, scores, and the SFT model's log-probs of both at ``reference_noise_strength`` for DPO's
reference) and ``<output_dir>/manifest.json``.
A complete output dir (manifest complete) is skipped on rerun (``force=true`` runs it anyway).

    python -m jobs.make_preferences --config jobs/configs/make_preferences/tiny.yaml [key=value ...]
"""

from __future__ import annotations

from stylear_core.preferences.stage import (
    PREFERENCES_FORMAT,
    PreferenceStageConfig,
    run_preference_stage,
)
from stylear_core.stages import run_stage

FORMAT = PREFERENCES_FORMAT
Config = PreferenceStageConfig


def main(argv: list[str] | None = None) -> dict:
    """Run the preference stage from ``argv`` (``--config FILE key=value ...``); returns its summary."""
    return run_stage(
        Config, run_preference_stage, argv, name="make_preferences", fmt=FORMAT, description=__doc__
    )


if __name__ == "__main__":
    main()

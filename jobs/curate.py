"""StyleAR data curation on Ray Data: stylize, CLIP-filter, mix with raw pairs, SAM-mask references, tokenize.

Takes a curation config (``jobs/configs/curate/{tiny,lumina7b}.yaml``, see
:class:`~stylear_core.curation.config.CurationConfig`) and ``key=value`` overrides. Gives
``<output_dir>/{stylized,curated,masks,tokens,preference_requests,errors}/*.parquet`` and
``<output_dir>/manifest.json`` (status complete, with the summary). A complete output dir is skipped on
rerun; an unfinished one (or ``force=true``) only does missing work.

    python -m jobs.curate --config jobs/configs/curate/tiny.yaml [key=value ...]
"""

from __future__ import annotations

from stylear_core.curation.config import CurationConfig
from stylear_core.curation.pipeline import MANIFEST_FORMAT, run_curation, skipped_run_summary, summary_lines
from stylear_core.stages import run_stage

Config = CurationConfig
FORMAT = MANIFEST_FORMAT


def main(argv: list[str] | None = None) -> dict:
    """Run the stage (``--config FILE key=value ...``): curate, write the manifest, print and return the summary."""
    return run_stage(
        Config, run_curation, argv, name="curate", fmt=FORMAT, description=__doc__, writes_manifest=True,
        summary_lines=summary_lines, on_skip=skipped_run_summary,
    )  # fmt: skip


if __name__ == "__main__":
    main()

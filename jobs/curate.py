"""StyleAR data curation on Ray Data: stylize, CLIP-filter, mix with raw pairs, SAM-mask references, tokenize.

Takes a curation config (``jobs/configs/curate/{tiny,lumina7b}.yaml``, see
:class:`~stylear_core.curation.config.CurationConfig`) and ``key=value`` overrides. Gives
``<output_dir>/{stylized,curated,masks,tokens,preference_requests,errors}/*.parquet`` and
``<output_dir>/manifest.json`` (status complete, with the summary). Rerunning on the same output dir
only does missing work.

    python -m jobs.curate --config jobs/configs/curate/tiny.yaml [key=value ...]
"""

from __future__ import annotations

from stylear_core.config import parse_job_args
from stylear_core.curation.config import CurationConfig
from stylear_core.curation.pipeline import run_curation, summary_lines
from stylear_core.ray_connection import connect_ray

Config = CurationConfig


def main(argv: list[str] | None = None) -> dict:
    """Parse the config, attach to Ray (unless already attached), run the pipeline, print and return the summary."""
    cfg = parse_job_args(Config, argv, description=__doc__)

    connect_ray(cfg.ray_address, log_prefix="[curate]")
    summary = run_curation(cfg)
    for line in summary_lines(summary):
        print(f"[curate] {line}", flush=True)
    return summary


if __name__ == "__main__":
    main()

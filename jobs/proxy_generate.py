"""Stage 2 of Proxy-Tuning: the DreamBooth-tuned supervisor generates proxy images of every subject, on Ray Data.

Takes the stage-1 output (``dreambooth_dir``: one LoRA per subject), the subject sets (instance images
for the filter) and a proxy-data config (``jobs/configs/proxy_generate/{tiny,lumina7b}.yaml``, see
:class:`~stylear_core.proxy.proxy_data.ProxyGenerateConfig`). Generates ``prompts.images_per_subject``
images per subject on supervisor actors, keeps those that pass the subject-similarity (DINO / CLIP-I)
and prompt-adherence (CLIP-T) filter and tokenizes them. Gives ``<output_dir>/{curated,tokens,errors}/``
and ``<output_dir>/manifest.json`` (status complete, the subjects). A rerun only does missing work.

    python -m jobs.proxy_generate --config jobs/configs/proxy_generate/tiny.yaml [key=value ...]
"""

from __future__ import annotations

from stylear_core.config import parse_job_args
from stylear_core.proxy.proxy_data import ProxyGenerateConfig, run_proxy_generation, summary_lines
from stylear_core.ray_connection import connect_ray

Config = ProxyGenerateConfig


def main(argv: list[str] | None = None) -> dict:
    """Parse the config, attach to Ray (unless attached), run the stage; prints and returns the summary."""
    cfg = parse_job_args(Config, argv, __doc__)

    connect_ray(cfg.ray_address, log_prefix="[proxy_generate]")
    summary = run_proxy_generation(cfg)
    for line in summary_lines(summary):
        print(f"[proxy_generate] {line}", flush=True)
    return summary


if __name__ == "__main__":
    main()

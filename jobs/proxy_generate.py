"""Stage 2 of Proxy-Tuning: the DreamBooth-tuned supervisor generates proxy images of every subject, on Ray Data.

Takes the stage-1 output (``dreambooth_dir``: one LoRA per subject), the subject sets (instance images
for the filter) and a proxy-data config (``jobs/configs/proxy_generate/{tiny,lumina7b}.yaml``, see
:class:`~stylear_core.proxy.proxy_data.ProxyGenerateConfig`). Generates ``prompts.images_per_subject``
images per subject on supervisor actors, keeps those that pass the subject-similarity (DINO / CLIP-I)
and prompt-adherence (CLIP-T) filter and tokenizes them. Gives ``<output_dir>/{curated,tokens,errors}/``
and ``<output_dir>/manifest.json`` (status complete, the subjects). A complete output dir is skipped on
rerun; an unfinished one only does missing work.

    python -m jobs.proxy_generate --config jobs/configs/proxy_generate/tiny.yaml [key=value ...]
"""

from __future__ import annotations

from stylear_core.proxy.proxy_data import (
    PROXY_FORMAT,
    ProxyGenerateConfig,
    run_proxy_generation,
    summary_lines,
)
from stylear_core.stages import run_stage

Config = ProxyGenerateConfig
FORMAT = PROXY_FORMAT


def main(argv: list[str] | None = None) -> dict:
    """Run the stage (``--config FILE key=value ...``): generate, filter, tokenize; returns the summary."""
    return run_stage(
        Config, run_proxy_generation, argv, name="proxy_generate", fmt=FORMAT, description=__doc__,
        writes_manifest=True, summary_lines=summary_lines,
    )  # fmt: skip


if __name__ == "__main__":
    main()

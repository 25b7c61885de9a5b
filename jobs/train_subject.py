"""Stage 3 of Proxy-Tuning: tune the AR model on the proxy token shards, every subject in one adapter.

Takes the stage-2 output (token shards with text prompts naming each subject's identifier, and the
manifest listing the subjects) and the model / loop / cluster blocks
(``jobs/configs/train_subject/{tiny,lumina7b}.yaml``, see
:class:`~stylear_core.proxy.subject_training.SubjectTrainConfig`). Trains with no style tokens on Ray
Train + DeepSpeed ZeRO (a rerun with the same ``ray.storage_path`` + ``ray.name`` resumes). Gives
``<output_dir>/adapter/`` (serving artefact, ``kind: subject`` with the subject list), a copy at
``<adapters_root>/<adapter_name>``, ``<output_dir>/metrics.jsonl`` and ``<output_dir>/manifest.json``.

    python -m jobs.train_subject --config jobs/configs/train_subject/tiny.yaml [key=value ...]
"""

from __future__ import annotations

from stylear_core.config import parse_job_args
from stylear_core.proxy.subject_training import SubjectTrainConfig, run_subject_training
from stylear_core.ray_connection import connect_ray

Config = SubjectTrainConfig


def main(argv: list[str] | None = None) -> dict:
    """Parse the config, attach to Ray (unless attached), train and export; prints and returns the summary."""
    cfg = parse_job_args(Config, argv, __doc__)

    connect_ray(cfg.ray.address, log_prefix="[train_subject]")
    summary = run_subject_training(cfg)
    print(f"[train_subject] {summary}", flush=True)
    return summary


if __name__ == "__main__":
    main()

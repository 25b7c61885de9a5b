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

from stylear_core.proxy.subject_training import SUBJECT_TRAIN_FORMAT, SubjectTrainConfig, run_subject_training
from stylear_core.stages import run_stage

Config = SubjectTrainConfig
FORMAT = SUBJECT_TRAIN_FORMAT


def main(argv: list[str] | None = None) -> dict:
    """Run the stage (``--config FILE key=value ...``): train, export, publish; returns the summary."""
    return run_stage(
        Config, run_subject_training, argv, name="train_subject", fmt=FORMAT, description=__doc__,
        writes_manifest=True,
    )  # fmt: skip


if __name__ == "__main__":
    main()

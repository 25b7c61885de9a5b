"""Stage 3 of Proxy-Tuning: fine-tune the AR model on the proxy token shards, several subjects in one adapter.

The student learns each subject from the supervisor's proxy images (stage 2) with the subject's
identifier in a plain Lumina-mGPT text-to-image prompt and no style tokens: the StyleAR SFT loop
(:class:`~stylear_core.training.objectives.StyleSFTObjective` with ``use_style_tokens=False``, Ray Train +
DeepSpeed ZeRO, checkpoints and resume) on rows of every subject at once, so one LoRA (or one fully
tuned backbone) holds them all.

The result is the serving artefact (``<output_dir>/adapter``, ``stylear.adapter/1``) with ``kind:
subject`` and the subject list (name, identifier, class noun) in its manifest; with ``adapters_root``
set it is also published as ``<adapters_root>/<adapter_name>`` once its probe, rerun through the serving
path, is within ``parity_tolerance`` (:func:`~stylear_core.adapters.publish.check_parity`; LoRA
adapters only): the layout the serving application's adapters root reads. ``<output_dir>/manifest.json`` (``stylear.train_subject/1``) closes the stage.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pyarrow.dataset as pads
import torch

from stylear_core.adapters.format import BACKBONE_WEIGHTS_NAME
from stylear_core.adapters.publish import check_parity, publish_adapter, served_parity_on_ray
from stylear_core.config import Resources, option, to_dict
from stylear_core.models.presets import ModelConfig
from stylear_core.proxy.proxy_data import proxy_subject_entries
from stylear_core.runs import read_manifest, write_manifest
from stylear_core.stages import StageConfig
from stylear_core.training.batches import TOKEN_SHARD_COLUMNS, read_parquet_dataset
from stylear_core.training.export import export_training_outcome
from stylear_core.training.loop import RayTrainConfig, TrainingOutcome, TrainLoopConfig, run_training
from stylear_core.training.objectives import StyleSFTObjective

SUBJECT_TRAIN_FORMAT = "stylear.train_subject/1"
SUBJECT_ADAPTER_KIND = "subject"


class SubjectSFTObjective(StyleSFTObjective):
    """Subject tuning: the StyleAR SFT step on plain text prompts, with no style tokens and a frozen resampler.

    Takes the model block. The loss is next-token cross-entropy on the image tokens given the text
    prompt (the identifier names the subject); only the backbone's LoRA (or, under ``trainable: full``,
    the backbone) trains. The exported adapter's probe is text-only, so
    :func:`~stylear_core.adapters.probe.verify_adapter` checks a reload as for style adapters.
    """

    name = "subject_sft"

    def __init__(self, model: ModelConfig):
        super().__init__(model, style_source="vq_decode", use_style_tokens=False)

    def setup(self, device: torch.device, precision: str) -> torch.nn.Module:
        """The model of the model block with its resampler frozen (no style tokens ever reach it)."""
        module = super().setup(device, precision)
        self.model.resampler.requires_grad_(False)
        return module


@dataclass
class SubjectDataConfig:
    """The proxy rows the student trains on."""

    token_shards: str = option("{run_dir}/proxy_generate/tokens", "token-shard parquet file or directory")
    proxy_dir: str = option("{run_dir}/proxy_generate", "stage-2 output whose manifest lists the subjects")
    limit: int = option(0, "use only the first N rows (0 = all)")
    cache: bool = option(False, "hold the rows in the object store after the first read (small data)")
    shuffle_files: bool = option(
        True,
        "read the shard files in an order shuffled by train.seed, the same in every epoch and attempt "
        "(proxy data has one subject's files after another's); false: path order",
    )


def shard_files(token_shards: str | Path) -> list[str]:
    """The complete parquet files of a token-shard path (a file, or a directory without hidden/temporary files)."""
    path = Path(token_shards)
    if path.is_file():
        return [str(path)]
    files = sorted(
        str(p) for p in path.rglob("*.parquet") if p.is_file() and not p.name.startswith((".", "_"))
    ) if path.is_dir() else []  # fmt: skip
    if not files:
        raise FileNotFoundError(
            f"{token_shards}: no token-shard parquet files (run jobs.proxy_generate first)"
        )
    return files


def rows_per_subject(files: Sequence[str], subjects: Sequence[Mapping[str, str]]) -> dict[str, int]:
    """How many rows of the shards name each subject's identifier (as a whole word) in their prompt.

    Raises :class:`ValueError` naming the subjects no row teaches: the adapter would claim a subject it
    never saw.
    """
    prompts = (
        pads.dataset(list(files), format="parquet").to_table(columns=["prompt"]).column("prompt").to_pylist()
    )
    counts = {}
    for s in subjects:
        word = re.compile(rf"\b{re.escape(s['identifier'])}\b")
        counts[s["name"]] = sum(1 for p in prompts if word.search(p or ""))
    empty = sorted(name for name, n in counts.items() if n == 0)
    if empty:
        raise ValueError(f"no proxy rows name subject(s) {empty}; the token shards cannot teach them")
    return counts


@dataclass
class SubjectTrainConfig(StageConfig):
    """Data, model, loop, cluster and publishing of the subject-tuning stage."""

    RENAMED_KEYS: ClassVar[dict] = {
        **StageConfig.RENAMED_KEYS,
        "parity_cpus": "parity_resources.cpus",
        "parity_gpus": "parity_resources.gpus",
    }

    output_dir: str = option("runs/tiny/train_subject", "stage output directory")
    data: SubjectDataConfig = option(SubjectDataConfig, "training rows")
    model: ModelConfig = option(ModelConfig, "the AR model to tune (its style path is built but unused)")
    train: TrainLoopConfig = option(TrainLoopConfig, "steps, batches, ZeRO, checkpoints")
    ray: RayTrainConfig = option(RayTrainConfig, "workers, storage, failures")
    adapters_root: str = option("{run_dir}/adapters", "also publish the adapter here ('' = do not)")
    adapter_name: str = option("subjects", "name of the published adapter (the serving request's `adapter`)")
    parity_tolerance: float = option(
        1e-4, "largest allowed probe difference between trained and served adapter before publishing"
    )
    parity_resources: Resources = option(Resources, "the parity-check task's CPUs and GPUs")


def subject_training_summary(
    outcome: TrainingOutcome, adapter: Path, published: Path | None, counts: Mapping[str, int]
) -> dict:
    """The stage summary: adapter paths, steps, final loss, rows per subject."""
    return {
        "adapter": str(adapter),
        "published": str(published) if published else None,
        "checkpoint": outcome.checkpoint.path if outcome.checkpoint else None,
        "steps": int(outcome.metrics.get("step", 0)),
        "final_loss": outcome.metrics.get("loss"),
        "metrics_log": str(outcome.metrics_log),
        "rows_per_subject": dict(counts),
        "status": "complete",
    }


def run_subject_training(cfg: SubjectTrainConfig) -> dict[str, Any]:
    """Run stage 3 of ``cfg`` on the current Ray cluster (``ray.init`` first); returns the summary.

    An unfinished output directory resumes from its latest Ray Train checkpoint (same ``ray.storage_path``
    + ``ray.name``); skipping a finished one is :func:`~stylear_core.stages.run_stage`'s part.
    """
    out = cfg.stage_dir
    subjects = proxy_subject_entries(cfg.path(cfg.data.proxy_dir))
    files = shard_files(cfg.path(cfg.data.token_shards))
    counts = rows_per_subject(files, subjects)
    shuffle_seed = cfg.train.seed if cfg.data.shuffle_files else None
    dataset = read_parquet_dataset(
        files, TOKEN_SHARD_COLUMNS, cfg.data.limit or None, cfg.data.cache, shuffle_seed
    )
    objective = SubjectSFTObjective(cfg.model)
    outcome = run_training(objective, cfg.train, cfg.ray, {"train": dataset}, out)
    adapter = export_training_outcome(
        outcome.checkpoint, out, cfg.model, outcome.metrics, kind=SUBJECT_ADAPTER_KIND, subjects=subjects
    )
    published = parity = None
    if cfg.adapters_root:
        if not (adapter / BACKBONE_WEIGHTS_NAME).is_file():
            # The export job's gate: the probe rerun through the serving path, before publishing. A fully
            # tuned backbone has no LoRA for the serving slot to check; it is published as before.
            lora_rank = int(
                ((read_manifest(adapter) or {}).get("lora") or {}).get("r") or cfg.model.lora_rank
            )
            res = cfg.parity_resources
            parity = served_parity_on_ray(cfg.model, adapter, lora_rank, res.cpus, res.gpus)
            check_parity(parity, cfg.parity_tolerance, adapter)
        published = publish_adapter(adapter, cfg.path(cfg.adapters_root), cfg.adapter_name)
    summary = {**subject_training_summary(outcome, adapter, published, counts), "served_parity": parity}
    write_manifest(
        out, SUBJECT_TRAIN_FORMAT, status="complete", config=to_dict(cfg), subjects=subjects, summary=summary
    )
    return summary

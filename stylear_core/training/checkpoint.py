"""Training checkpoints: DeepSpeed shards of every rank inside one Ray Train checkpoint directory.

Every rank calls :func:`save_training_checkpoint` into its own temporary directory, then
``ray.train.report(..., checkpoint=Checkpoint.from_directory(dir))``; Ray Train persists all ranks'
files into the same checkpoint directory under ``storage_path/name/``. A checkpoint directory holds::

    latest, zero_to_fp32.py         DeepSpeed's (rank 0)
    state/                          DeepSpeed tag dir: module states (trainable parameters only) and
                                    each rank's ZeRO optimizer partition
    train_state.json                the loop position (rank 0): step, epoch, batch in epoch, samples
    adapter/                        the serving artefact (rank 0; final checkpoint only, see export.py)

Frozen parameters (the base model under LoRA) are excluded from the DeepSpeed files: they are
rebuilt from the model config, so a LoRA checkpoint of the 7B model stays small.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

DEEPSPEED_TAG = "state"
TRAIN_STATE_NAME = "train_state.json"


@dataclass
class TrainState:
    """Where the loop is: optimizer ``step``\\ s done, data ``epoch``, micro-batches consumed in the epoch
    (``batch_in_epoch``, per rank) and samples consumed over all ranks."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples_seen: int = 0

    def to_dict(self) -> dict[str, int]:
        """The fields as a JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        """Read the fields this class knows from ``data`` (extra keys are ignored)."""
        return cls(
            **{k: int(data[k]) for k in ("step", "epoch", "batch_in_epoch", "samples_seen") if k in data}
        )


def save_training_checkpoint(engine: Any, state: TrainState, directory: str | Path, rank: int) -> Path:
    """Collective: write this rank's DeepSpeed shard of ``engine`` and (rank 0) ``train_state.json``.

    All ranks must call it with the same ``state``; returns ``directory``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(
        str(directory),
        tag=DEEPSPEED_TAG,
        client_state={"train_state": state.to_dict()},
        exclude_frozen_parameters=True,
    )
    if rank == 0:
        (directory / TRAIN_STATE_NAME).write_text(json.dumps(state.to_dict(), indent=2))
    return directory


def load_training_checkpoint(engine: Any, directory: str | Path) -> TrainState:
    """Collective: restore ``engine`` (trainable weights, optimizer, LR schedule) from a checkpoint
    directory written by :func:`save_training_checkpoint`; returns the saved :class:`TrainState`."""
    path, client_state = engine.load_checkpoint(
        str(directory),
        tag=DEEPSPEED_TAG,
        load_module_strict=False,  # frozen parameters were not saved
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if path is None:
        raise FileNotFoundError(f"{directory}: no DeepSpeed checkpoint under tag {DEEPSPEED_TAG!r}")
    return TrainState.from_dict((client_state or {}).get("train_state", {}))


def read_train_state(directory: str | Path) -> TrainState | None:
    """The loop position saved in a checkpoint directory, or None when it has none."""
    path = Path(directory) / TRAIN_STATE_NAME
    return TrainState.from_dict(json.loads(path.read_text())) if path.is_file() else None

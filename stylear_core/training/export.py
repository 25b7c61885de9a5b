"""The training side of an adapter: a trained model or a final checkpoint turned into an adapter artefact.

Under ZeRO-3 the trainable parameters are sharded: :func:`export_adapter` gathers them (a collective:
every rank calls it) and rank 0 writes them in the layout of :mod:`stylear_core.adapters.format`
(through :mod:`stylear_core.adapters.io`). :func:`export_training_outcome` copies the adapter out of the
final Ray Train checkpoint into ``<output_dir>/adapter`` with its manifest. Reading, loading, probing and
publishing adapters live in :mod:`stylear_core.adapters`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stylear_core.adapters.format import ADAPTER_DIRNAME, RESAMPLER_WEIGHTS_NAME, base_model_id
from stylear_core.adapters.io import copy_adapter, save_backbone_state, save_resampler_state
from stylear_core.models.lora import DEFAULT_ADAPTER, has_lora, save_lora
from stylear_core.models.stylear import StyleARModel


@contextmanager
def gathered_parameters(params: list[nn.Parameter]) -> Iterator[None]:
    """Inside the block ZeRO-3-partitioned ``params`` hold their full values (a collective: every rank
    must enter it); a no-op for parameters DeepSpeed does not partition (ZeRO-2, plain modules)."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def _cpu_state(named: Iterator[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in named}


def export_adapter(
    model: StyleARModel,
    directory: str | Path,
    rank: int = 0,
    adapter_name: str = DEFAULT_ADAPTER,
    full_backbone: bool = False,
) -> Path | None:
    """Write ``model``'s trained parts into ``directory`` (rank 0); every rank must call it under ZeRO-3.

    Writes the LoRA adapter ``adapter_name`` (when the backbone has one), the resampler and, with
    ``full_backbone``, every backbone weight (gathered one tensor at a time to bound memory). Returns
    the directory on rank 0, None elsewhere.
    """
    directory = Path(directory)
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
    if has_lora(model.backbone, adapter_name):
        lora = [p for n, p in model.backbone.named_parameters() if ".lora_" in n and f".{adapter_name}." in n]
        with gathered_parameters(lora):
            if rank == 0:
                save_lora(model.backbone, directory, adapter_name)
    with gathered_parameters(list(model.resampler.parameters())):
        if rank == 0:
            save_resampler_state(directory, _cpu_state(model.resampler.state_dict().items()))
    if full_backbone:
        state: dict[str, torch.Tensor] = {}
        for name, param in model.backbone.named_parameters():
            with gathered_parameters([param]):
                if rank == 0:
                    state[name] = param.detach().to("cpu").contiguous().clone()
        if rank == 0:
            save_backbone_state(directory, state)
    return directory if rank == 0 else None


def finalize_export(checkpoint_dir: str | Path, output_dir: str | Path, **manifest: Any) -> Path:
    """Copy the ``adapter/`` of a final training checkpoint to ``<output_dir>/adapter`` and write its
    manifest (format ``stylear.adapter/1``, ``status: complete``, plus ``manifest`` fields such as
    ``base_model``, ``preset``, ``step``, ``metrics``). Returns the adapter directory."""
    source = Path(checkpoint_dir) / ADAPTER_DIRNAME
    if not (source / RESAMPLER_WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{checkpoint_dir}: the checkpoint holds no exported adapter")
    return copy_adapter(source, Path(output_dir) / ADAPTER_DIRNAME, **manifest)


def export_training_outcome(
    checkpoint: Any, output_dir: str | Path, model_cfg: Any, metrics: dict[str, Any], **manifest: Any
) -> Path:
    """Driver side: copy the adapter out of the final ``ray.train.Checkpoint`` into ``<output_dir>/adapter``
    with a manifest naming the base model, preset, step, metrics (digests apart) and the model block."""
    from stylear_core.config import to_dict

    if checkpoint is None:
        raise RuntimeError("the training run left no checkpoint to export")
    scalars = {
        k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not k.startswith("digest/")
    }
    digests = {k.removeprefix("digest/"): v for k, v in metrics.items() if k.startswith("digest/")}
    with checkpoint.as_directory() as directory:
        return finalize_export(
            directory,
            output_dir,
            base_model=base_model_id(model_cfg),
            preset=model_cfg.preset,
            step=int(metrics.get("step", 0)),
            metrics=scalars,
            digests=digests,
            model_config=to_dict(model_cfg),
            **manifest,
        )

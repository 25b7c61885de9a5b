"""The Ray Train + DeepSpeed training loop shared by the SFT and DPO jobs.

:func:`run_training` (driver) starts a ``TorchTrainer`` whose workers run :func:`train_loop_per_worker`:

* the objective (:mod:`stylear_core.training.objectives`) builds the model on the worker;
  ``deepspeed.initialize`` wraps it with ZeRO stage 2 or 3, a torch AdamW and a warmup + cosine
  ``LambdaLR`` (bf16 on GPUs, fp32 on CPU with gloo; DeepSpeed is imported inside the loop, after
  ``DS_ACCELERATOR`` is set);
* micro-batches come from ``ray.train.get_dataset_shard("train")`` (read with ``preserve_order``,
  so every rank sees the same rows on every attempt); ``grad_accum_steps`` micro-batches make one
  optimizer step;
* every step's metrics are reduced over ranks (loss, lr, tokens/s, the objective's own metrics);
  every ``log_every`` steps all ranks call ``ray.train.report`` with the latest step's metrics
  and the rows of the steps since the last report (``history``); every ``checkpoint_every`` steps
  and at the end the report carries a checkpoint holding every rank's DeepSpeed shard (report is a barrier:
  all ranks report the same number of times);
* a restarted attempt (``FailureConfig``) or a rerun with the same ``storage_path`` + ``name``
  starts from ``ray.train.get_checkpoint()``: same weights, optimizer and schedule, same step
  count, and the same data position (the micro-batches of the current epoch already consumed are
  skipped);
* the final checkpoint also holds the exported adapter, a probe for checking reloads, and
  (``verify_frozen``) SHA-256 digests of every parameter group, reported as metrics.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import ray.train
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from stylear_core.adapters.format import ADAPTER_DIRNAME
from stylear_core.adapters.probe import write_probe
from stylear_core.config import ConfigError, Resources, bool_to_count, option
from stylear_core.training.checkpoint import TrainState, load_training_checkpoint, save_training_checkpoint
from stylear_core.training.deepspeed_config import build_deepspeed_config, resolve_precision
from stylear_core.training.export import gathered_parameters
from stylear_core.training.metrics import METRICS_LOG_NAME, MetricsLogCallback, ThroughputMeter
from stylear_core.training.schedule import warmup_cosine_scheduler


class InjectedFailure(RuntimeError):
    """Raised by ``fail_at_step`` to exercise restarts from checkpoints."""


@dataclass
class OptimizerConfig:
    """AdamW and the warmup + cosine learning-rate schedule."""

    lr: float = option(1e-4, "peak learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    betas: list[float] = option([0.9, 0.95], "AdamW betas")
    eps: float = option(1e-8, "AdamW epsilon")
    warmup_steps: int = option(0, "linear warmup steps")
    min_lr_ratio: float = option(0.1, "cosine floor as a fraction of lr")
    grad_clip: float = option(1.0, "gradient-norm clip (0 = off)")


def adamw_kernel(device_types: set[str], offload: bool = False) -> dict[str, bool]:
    """AdamW's implementation switch for parameters on ``device_types``: ``{"fused": True}`` or ``{"foreach": True}``.

    Fused (one kernel for the whole update) where every parameter is on a CUDA device; foreach (a
    few batched kernels) otherwise. With ``offload`` DeepSpeed moves the optimizer's partitions to CPU
    memory after the optimizer is built, so the CUDA-only choice made here would not hold: foreach.
    """
    if device_types == {"cuda"} and not offload:
        return {"fused": True}
    return {"foreach": True}


def build_adamw(
    params: list[torch.nn.Parameter], opt: OptimizerConfig, offload: bool = False
) -> torch.optim.AdamW:
    """torch AdamW over ``params`` with ``opt``'s settings and the :func:`adamw_kernel` implementation."""
    kernel = adamw_kernel({p.device.type for p in params}, offload)
    return torch.optim.AdamW(
        params, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay, **kernel
    )


@dataclass
class TrainLoopConfig:
    """Steps, batch geometry, ZeRO stage, precision, checkpointing and logging of a training run."""

    max_steps: int = option(100, "optimizer steps to run")
    micro_batch_size: int = option(1, "rows per rank per forward")
    grad_accum_steps: int = option(1, "micro-batches per optimizer step")
    zero_stage: int = option(
        2, "DeepSpeed ZeRO stage: 2 shards optimizer state and grads, 3 also params", choices=(2, 3)
    )
    precision: Literal["auto", "fp32", "bf16"] = option("auto", "auto: bf16 on GPUs, fp32 on CPU")
    offload_optimizer: bool = option(False, "keep the ZeRO optimizer state in CPU memory")
    checkpoint_every: int = option(50, "steps between checkpoints (the last step always checkpoints)")
    keep_checkpoints: int = option(2, "checkpoints kept in storage (oldest deleted first)")
    log_every: int = option(
        1,
        "steps between ray.train.report calls (every step is logged: a report carries the steps since the last)",
    )
    seed: int = option(0, "seed of dropout and style noise (the model's own init seed is in the model block)")
    verify_frozen: bool = option(True, "report SHA-256 digests of every parameter group at the end")
    record_sample_ids: bool = option(False, "report the CRC32 ids of rank 0's rows each step (debugging)")
    fail_at_step: int = option(0, "raise once after this step on a fresh (not resumed) attempt; 0 = never")
    optimizer: OptimizerConfig = option(OptimizerConfig, "optimizer and LR schedule")

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first inconsistent field."""
        for name in ("max_steps", "micro_batch_size", "grad_accum_steps", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_every % self.log_every:
            raise ConfigError(
                "checkpoint_every: must be a multiple of log_every (checkpoints ride on reports)"
            )


@dataclass
class RayTrainConfig:
    """Where and on what the run executes: workers, resources, storage and failure handling."""

    # Old spellings of the worker's resources, still read.
    RENAMED_KEYS: ClassVar[dict] = {
        "cpus_per_worker": "worker.cpus",
        "use_gpu": ("worker.gpus", bool_to_count),
    }

    num_workers: int = option(2, "Ray Train workers (data-parallel ranks)")
    worker: Resources = option(
        Resources, "each worker's CPUs and GPUs (gpus 0: CPU workers on gloo; gpus > 0: GPU workers on NCCL)"
    )
    storage_path: str | None = option(
        None, "checkpoint storage (shared on a multi-node cluster); default <output_dir>/checkpoints"
    )
    name: str = option("train", "run name under storage_path: rerunning with the same name resumes")
    max_failures: int = option(1, "worker-group restarts from the latest checkpoint before giving up")

    @property
    def use_gpu(self) -> bool:
        """Whether the workers train on GPUs."""
        return self.worker.gpus > 0

    def resources_per_worker(self) -> dict[str, float]:
        """Ray Train's ``resources_per_worker``."""
        return {"CPU": self.worker.cpus, **({"GPU": self.worker.gpus} if self.use_gpu else {})}


def _device_for(use_gpu: bool) -> torch.device:
    if use_gpu and torch.cuda.is_available():
        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def group_digests(groups: dict[str, list[tuple[str, torch.nn.Parameter]]], rank: int) -> dict[str, str]:
    """SHA-256 over each group's parameters (name and bytes, in name order); a collective under ZeRO-3.

    Only rank 0's result is meaningful (others return an empty dict).
    """
    out: dict[str, str] = {}
    for group, named in groups.items():
        h = hashlib.sha256()
        for name, param in sorted(named, key=lambda item: item[0]):
            with gathered_parameters([param]):
                if rank == 0:
                    h.update(name.encode())
                    h.update(param.detach().float().cpu().numpy().tobytes())
        if rank == 0:
            out[group] = h.hexdigest()
    return out


class _Window:
    """Sums of one reporting window's micro-batch results, reduced over ranks on demand."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start a new window."""
        self.loss = 0.0
        self.count = 0
        self.tokens = 0
        self.sums: dict[str, float] = {}

    def add(self, loss: float, tokens: int, metrics: dict[str, float]) -> None:
        """Add one micro-batch's loss, token count and metrics."""
        self.loss += loss
        self.count += 1
        self.tokens += tokens
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def reduce(self, device: torch.device) -> dict[str, float]:
        """Collective: means over all ranks' micro-batches (``loss`` and metrics) and the summed ``tokens``."""
        keys = sorted(self.sums)
        values = torch.tensor(
            [self.loss, self.count, self.tokens, *[self.sums[k] for k in keys]], dtype=torch.float64
        )
        values = values.to(device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(values)
        values = values.cpu().tolist()
        count = max(values[1], 1.0)
        out = {"loss": values[0] / count, "tokens": values[2]}
        out.update({k: v / count for k, v in zip(keys, values[3:])})
        return out


def quiet_report_echo() -> None:
    """Stop this worker's Ray Train from echoing each report's metrics into the job's log.

    Ray Train (2.60) logs every ``ray.train.report`` at INFO with its whole metrics dict, on a logger named
    by its module's file path: outside ``ray.train``, so ``RunConfig(logging_config=...)`` does not reach
    it. Here a report carries every step's row since the last one, so each echo was a line of about 14 kB
    (half the bytes of ``make demo``'s log); the same rows are in ``metrics.jsonl``. Warnings still show.
    """
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: leave its logging as it is
        return
    echo = getattr(context, "logger", None)
    if isinstance(echo, logging.Logger):
        echo.setLevel(logging.WARNING)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function; ``config`` holds ``objective``, ``train`` (:class:`TrainLoopConfig`)
    and ``use_gpu``."""
    quiet_report_echo()
    objective = config["objective"]
    train: TrainLoopConfig = config["train"]
    use_gpu = bool(config["use_gpu"]) and torch.cuda.is_available()
    if not use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed  # after DS_ACCELERATOR: DeepSpeed picks its accelerator on import

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = _device_for(use_gpu)
    precision = resolve_precision(train.precision, use_gpu)
    torch.manual_seed(train.seed + 1000 * rank)

    module = objective.setup(device, precision)
    opt = train.optimizer
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = build_adamw(trainable, opt, train.offload_optimizer)
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        optimizer=optimizer,
        lr_scheduler=lambda o: warmup_cosine_scheduler(
            o, opt.warmup_steps, train.max_steps, opt.min_lr_ratio
        ),
        config=build_deepspeed_config(
            train.zero_stage,
            train.micro_batch_size,
            train.grad_accum_steps,
            world,
            precision,
            opt.grad_clip,
            train.offload_optimizer,
            on_gpu=use_gpu,
        ),
    )

    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_training_checkpoint(engine, directory)
    resumed_from = state.step

    def report(metrics: dict[str, Any], with_checkpoint: bool, final: bool, batch: dict | None) -> None:
        """Every rank: report ``metrics``, with a checkpoint of all ranks' shards (and the export when final)."""
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        directory = Path(tempfile.mkdtemp(prefix="sar-ckpt-"))
        try:
            save_training_checkpoint(engine, state, directory, rank)
            if final:
                objective.export(str(directory / ADAPTER_DIRNAME), rank)
                if batch is not None:
                    engine.eval()
                    probe, outputs = objective.probe(engine, batch)
                    engine.train()
                    if rank == 0:
                        write_probe(directory / ADAPTER_DIRNAME, probe, outputs)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)))
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    shard = ray.train.get_dataset_shard("train")
    collate = objective.collate_fn()
    window, meter = _Window(), ThroughputMeter()
    micro_done, last_batch, sample_ids, history = 0, None, [], []
    engine.train()
    while state.step < train.max_steps:
        seen = 0
        batches = shard.iter_torch_batches(
            batch_size=train.micro_batch_size,
            collate_fn=collate,
            drop_last=True,
            device="cpu",
            prefetch_batches=2,
        )
        for batch in batches:
            seen += 1
            if seen <= state.batch_in_epoch:
                continue  # consumed before the checkpoint this attempt resumed from
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            if micro_done % train.grad_accum_steps == 0:
                lr = float(engine.get_lr()[0])
            result = objective.compute(engine, batch)
            engine.backward(result.loss)
            engine.step()
            micro_done += 1
            state.batch_in_epoch = seen
            window.add(float(result.loss.detach()), result.tokens, result.metrics)
            if train.record_sample_ids:
                sample_ids.extend(int(i) for i in batch["id_hash"].tolist())
            last_batch = batch
            if micro_done % train.grad_accum_steps:
                continue
            state.step += 1
            state.samples_seen += train.micro_batch_size * train.grad_accum_steps * world
            if train.fail_at_step and state.step == train.fail_at_step and checkpoint is None and rank == 0:
                raise InjectedFailure(
                    f"fail_at_step={train.fail_at_step}: injected failure after step {state.step}"
                )
            final = state.step >= train.max_steps
            reduced = window.reduce(engine.device)
            seconds, tokens_per_s = meter.mark(reduced.pop("tokens"))
            row: dict[str, Any] = {
                "step": state.step,
                "epoch": state.epoch,
                "samples_seen": state.samples_seen,
                "lr": lr,
                "tokens_per_s": tokens_per_s,
                "seconds": seconds,
                "resumed_from": resumed_from,
                **reduced,
            }
            if train.record_sample_ids:
                row["sample_ids"], sample_ids = sample_ids, []
            if final and train.verify_frozen:
                row.update(
                    {f"digest/{k}": v for k, v in group_digests(objective.parameter_groups(), rank).items()}
                )
            history.append(row)
            window.reset()
            if state.step % train.log_every == 0 or final:
                # A report blocks until the controller has taken the previous one (it polls every few
                # seconds), so the rows of several steps travel in one report.
                metrics = {**row, "history": history}
                history = []
                report(metrics, state.step % train.checkpoint_every == 0 or final, final, last_batch)
            if final:
                break
        else:
            if seen == 0:
                raise RuntimeError(
                    f"rank {rank}: the training data gives no full micro-batch of {train.micro_batch_size} rows"
                )
            state.epoch += 1
            state.batch_in_epoch = 0
            continue
        break


@dataclass
class TrainingOutcome:
    """What a finished run left: the final ``metrics`` (rank 0's last report), the latest checkpoint's
    ``checkpoint`` (a ``ray.train.Checkpoint``), the ``storage`` directory and the ``metrics_log`` path."""

    metrics: dict[str, Any]
    checkpoint: ray.train.Checkpoint | None
    storage: str
    metrics_log: Path


def data_cpu_shortfall(cluster: RayTrainConfig) -> str | None:
    """Why training would wait for CPUs now, or ``None``: the Train workers reserve their CPUs, and Ray
    Data's reads of the shards need at least one more; on a cluster without them (a 2-CPU local head with
    2-CPU workers) training waits until the cluster grows, which on a fixed cluster is forever."""
    wanted = cluster.num_workers * cluster.worker.cpus + 1
    free = ray.available_resources().get("CPU", 0.0)
    if free >= wanted:
        return None
    return (
        f"the Train workers reserve {cluster.num_workers} x {cluster.worker.cpus} CPU and Ray Data's reads "
        f"need 1 more, but {free:g} CPU are free now: training waits until the cluster has {wanted:g} free "
        "(lower ray.worker.cpus, or give the cluster more CPUs)"
    )


def run_training(
    objective: Any,
    train: TrainLoopConfig,
    cluster: RayTrainConfig,
    datasets: dict[str, Any],
    output_dir: str | Path,
) -> TrainingOutcome:
    """Run ``objective`` on a ``TorchTrainer`` (driver side) and return its :class:`TrainingOutcome`.

    Metrics go to ``<output_dir>/metrics.jsonl`` and a driver progress bar; checkpoints to
    ``cluster.storage_path`` (default ``<output_dir>/checkpoints``) under ``cluster.name``, where a
    rerun resumes. Raises ``ray.train.TrainingFailedError`` once ``max_failures`` restarts are spent.
    """
    from ray.data import ExecutionOptions

    output_dir = Path(output_dir).resolve()
    storage = cluster.storage_path or str(output_dir / "checkpoints")
    metrics_log = output_dir / METRICS_LOG_NAME
    resources = cluster.resources_per_worker()
    if shortfall := data_cpu_shortfall(cluster):
        print(f"[{cluster.name}] warning: {shortfall}", flush=True)
    for dataset in datasets.values():
        # The training bar shows progress; Ray Data's bars for feeding it (drawn by the split coordinator,
        # which runs with each dataset's own context) would add a line per block and epoch to the job log.
        dataset.context.enable_progress_bars = False
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"objective": objective, "train": train, "use_gpu": cluster.use_gpu},
        scaling_config=ScalingConfig(
            num_workers=cluster.num_workers, use_gpu=cluster.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=cluster.name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cluster.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=train.keep_checkpoints),
            callbacks=[MetricsLogCallback(metrics_log, train.max_steps, objective.name)],
        ),
        datasets=datasets,
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
    )
    result = trainer.fit()
    return TrainingOutcome(dict(result.metrics or {}), result.checkpoint, storage, metrics_log)

"""Training-throughput benchmark: Ray Train + DeepSpeed ZeRO vs a plain training step, same model, same run.

    python benchmarks/train.py --preset tiny                                   # CPU, tiny, ~a minute
    python benchmarks/train.py --preset lumina7b --image-size 768 --zero-stage 2 --micro-batch 2
                                                                               # one GPU, random 7B, seq ~2.4k

Every runner trains the same StyleAR SFT step (VQ-decode of the target, frozen CLIP, resampler, LoRA
backbone with activation checkpointing; loss on image tokens) on the same synthetic rows:

* ``plain``: one process, torch AdamW, ``loss.backward(); opt.step()`` -- the baseline;
* ``deepspeed``: one process, ``deepspeed.initialize`` with the chosen ZeRO stage (works without Ray);
* ``ray``: ``TorchTrainer`` workers running the project's training loop
  (:func:`stylear_core.training.loop.train_loop_per_worker`) with its data path, reports and checkpoints.

* ``plain_masked``: ``plain`` on the padded layout with an explicit attention mask
  (``model.padding_free: false``), to time the padding-free default against it (with ``plain`` in
  the same run, their steps alternate on one model so that load on a shared machine hits both alike).
* ``plain_features``: the ``plain`` step on the same rows with their CLIP style features computed once
  before timing (curation's path: VQ round trip of the tokens, frozen CLIP, fp16; ``style_source:
  features``), so the step runs neither the VQGAN nor CLIP; its steps alternate with on-the-fly
  ``vq_decode`` steps on one model, and the per-step times before and after the precompute are printed.

The synthetic rows have mixed prompt lengths (every micro-batch holds the same mix), so batches are
padded and the masked and padding-free paths differ. It prints, each with its formula
(:mod:`stylear_core.training.flops`): tokens/s (real prompt + image tokens, pads not counted);
model-FLOPs utilisation (LoRA ``4N + 2N_lora`` ≈ ``4N``, full fine-tuning ``6N``, plus causal
attention; ``N`` = the backbone's computing parameters, embedding table excluded, LM head included);
hardware-FLOPs utilisation (adds the forward that activation checkpointing recomputes). Peak = the
GPU's dense bf16 FLOP/s, or on CPU a measured fp32 matmul rate. Also each runner's ratio to
``plain``. The median step after ``--warmup`` steps is used; the Ray runner's last step (which
checkpoints and exports) is left out.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.local import apply_project_env  # noqa: E402
from stylear_core.data.layout import ImageTokenLayout  # noqa: E402
from stylear_core.data.style_features import (  # noqa: E402
    compute_style_features,
    features_key,
    style_encoder_digest,
    vq_decoded_images,
)
from stylear_core.data.tokenizer import style_prompt_ids  # noqa: E402
from stylear_core.models.lora import add_lora  # noqa: E402
from stylear_core.models.presets import (  # noqa: E402
    ModelConfig,
    build_backbone,
    build_prompt_tokenizer,
    build_style_encoder,
    build_vqgan,
)
from stylear_core.training.batches import TokenBatchCollate  # noqa: E402
from stylear_core.training.deepspeed_config import build_deepspeed_config  # noqa: E402
from stylear_core.training.flops import (  # noqa: E402
    HARDWARE_FLOPS_FORMULA,
    MODEL_FLOPS_FORMULA,
    BackboneFlopCounts,
    backbone_flop_counts,
    training_step_flops,
)
from stylear_core.training.loop import OptimizerConfig, build_adamw  # noqa: E402
from stylear_core.training.objectives import StyleSFTObjective  # noqa: E402

# Dense bf16 tensor-core peak per GPU (FLOP/s), by a substring of the device name.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def checkpointing_setting(text: str) -> bool | float:
    """``--checkpointing``: ``true`` / ``false``, or a fraction of the decoder layers."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    return float(text)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (timings must not stop while kernels still run)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops(device: torch.device) -> tuple[float, str]:
    """The FLOP/s MFU is measured against, and where the number comes from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops, f"{name} dense bf16 peak"
        return float("nan"), f"{name}: peak unknown"
    a = torch.randn(1024, 1024)
    a @ a
    start = time.perf_counter()
    for _ in range(10):
        a @ a
    seconds = time.perf_counter() - start
    return 10 * 2 * 1024**3 / seconds, "measured CPU fp32 matmul rate"


# Prompt tails of different lengths: rows of one micro-batch differ in length, so batches carry padding.
PROMPT_TAILS = ("", " under a grey evening sky with thin clouds", " on a wide plain", " drawn in ink")


def synthetic_rows(model_cfg: ModelConfig, count: int, seed: int = 0, micro_batch: int = 2) -> list[dict]:
    """Token-shard rows of random VQ codes at ``model_cfg.image_size`` with StyleAR prompts.

    Prompt lengths differ within each run of ``micro_batch`` rows and repeat from one run to the next,
    so every micro-batch holds the same mix of lengths (and so the same FLOPs).
    """
    vocab = build_backbone(model_cfg, "meta")[1]
    tokenizer = build_prompt_tokenizer(model_cfg, vocab)
    size = model_cfg.image_size
    layout = ImageTokenLayout.for_resolution(size, size, vocab)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(count):
        codes = torch.randint(0, vocab.codebook_size, (layout.h_latent, layout.w_latent), generator=gen)
        prompt = f"a red circle at the center{PROMPT_TAILS[(i % micro_batch) % len(PROMPT_TAILS)]}"
        rows.append(
            {
                "id": f"bench-{i}",
                "prompt": prompt,
                "prompt_ids": style_prompt_ids(tokenizer, prompt, model_cfg.num_style_tokens, size, size),
                "image_tokens": layout.encode(codes).tolist(),
                "height": size,
                "width": size,
            }
        )
    return rows


def numpy_batches(rows: list[dict], micro_batch: int) -> list[dict]:
    """Rows -> the numpy batches Ray Data would hand the collate function."""
    import numpy as np

    batches = []
    for start in range(0, len(rows) - micro_batch + 1, micro_batch):
        chunk = rows[start : start + micro_batch]
        batch = {}
        for key in chunk[0]:
            arr = np.empty(len(chunk), dtype=object)
            arr[:] = [np.asarray(r[key]) if isinstance(r[key], list) else r[key] for r in chunk]
            batch[key] = arr
        batches.append(batch)
    return batches


def with_style_features(
    model_cfg: ModelConfig, rows: list[dict], device: torch.device
) -> tuple[list[dict], float]:
    """``rows`` with their ``style_features`` (and key) precomputed as curation's tokenize step does
    (``tokenize.style_features: vq_decode``), and the seconds that took per row."""
    import numpy as np

    vocab = build_backbone(model_cfg, "meta")[1]
    vqgan, encoder = build_vqgan(model_cfg, vocab, device), build_style_encoder(model_cfg, device)
    key = features_key(style_encoder_digest(model_cfg), "vq_decode")
    synchronize(device)
    start = time.perf_counter()
    tokens = torch.tensor([r["image_tokens"] for r in rows])
    sizes = [(r["height"], r["width"]) for r in rows]
    features = compute_style_features(encoder, vq_decoded_images(vqgan, tokens, sizes, vocab))
    synchronize(device)
    seconds = (time.perf_counter() - start) / len(rows)
    out = [
        {**r, "style_features": f.reshape(-1).numpy().astype(np.float16), "style_features_key": key}
        for r, f in zip(rows, features)
    ]
    return out, seconds


def time_steps(step, batches: list[dict], steps: int, device: torch.device) -> tuple[list[float], int]:
    """Wall seconds of each of ``steps`` calls of ``step(batch)`` (cycling over batches) and tokens per step."""
    times, tokens = [], 0
    for i in range(steps):
        synchronize(device)
        start = time.perf_counter()
        tokens = step(batches[i % len(batches)])
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times, tokens


def device_batches(collate, rows: list[dict], micro_batch: int, device: torch.device) -> list[dict]:
    """``rows`` in micro-batches through ``collate``, on ``device``."""
    return [{k: v.to(device) for k, v in collate(b).items()} for b in numpy_batches(rows, micro_batch)]


def plain_step(objective: StyleSFTObjective, module: torch.nn.Module):
    """One plain training step of ``objective`` on ``module`` with the training loop's AdamW (fused on
    CUDA): ``step(batch) -> tokens``."""
    optimizer = build_adamw([p for p in module.parameters() if p.requires_grad], OptimizerConfig(lr=1e-4))

    def step(batch: dict) -> int:
        result = objective.compute(module, batch)
        result.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return result.tokens

    return step


def run_plain(
    model_cfg: ModelConfig, rows: list[dict], args, device: torch.device, interleave_masked: bool = False
) -> dict:
    """The baseline: one process, torch AdamW on the trainable parameters.

    ``interleave_masked``: every step is followed by one on the masked layout (same model, same batch),
    timed apart and given as ``masked_step_s``: drifting load on a shared machine then hits both alike.
    """
    objective = StyleSFTObjective(model_cfg)
    module = objective.setup(device, args.precision).train()
    batches = device_batches(objective.collate_fn(), rows, args.micro_batch, device)
    step = plain_step(objective, module)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    masked_times: list[float] = []
    if interleave_masked:
        times = []
        for i in range(args.warmup + args.steps):
            batch = [batches[i % len(batches)]]
            for padding_free, into in ((True, times), (False, masked_times)):
                objective.model.padding_free = padding_free
                seconds, tokens = time_steps(step, batch, 1, device)
                into += seconds
        objective.model.padding_free = model_cfg.padding_free
    else:
        times, tokens = time_steps(step, batches, args.warmup + args.steps, device)
    result = {"step_s": statistics.median(times[args.warmup :]), "tokens": tokens}
    if masked_times:
        result["masked_step_s"] = statistics.median(masked_times[args.warmup :])
    if device.type == "cuda":  # what a checkpointing fraction must fit in
        result["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return result


def run_plain_features(
    model_cfg: ModelConfig, rows: list[dict], args, device: torch.device
) -> tuple[dict, dict]:
    """The ``plain`` step with style features on the fly (``vq_decode``) and precomputed once, alternating
    step by step on one model and the same batches (load drifting on a shared machine hits both alike):
    a batch carrying ``style_features`` (collated as ``style_source: features`` collates) skips the VQGAN
    decode, the CLIP preprocessing and CLIP. Gives both results; the second has ``precompute_s`` per row.
    """
    feature_rows, precompute_s = with_style_features(model_cfg, rows, device)
    objective = StyleSFTObjective(model_cfg)
    module = objective.setup(device, args.precision).train()
    model = objective.model
    cached_collate = TokenBatchCollate(
        model.vocab,
        objective.tokenizer,
        model.num_style_tokens,
        features_shape=(model.style_encoder.num_tokens, model.style_encoder.width),
        features_encoder=style_encoder_digest(model_cfg),
    )
    live = device_batches(objective.collate_fn(), rows, args.micro_batch, device)
    cached = device_batches(cached_collate, feature_rows, args.micro_batch, device)
    step = plain_step(objective, module)
    live_times: list[float] = []
    cached_times: list[float] = []
    for i in range(args.warmup + args.steps):
        for batches, into in ((live, live_times), (cached, cached_times)):
            seconds, tokens = time_steps(step, [batches[i % len(batches)]], 1, device)
            into += seconds
    return (
        {"step_s": statistics.median(live_times[args.warmup :]), "tokens": tokens},
        {
            "step_s": statistics.median(cached_times[args.warmup :]),
            "tokens": tokens,
            "precompute_s": precompute_s,
        },
    )


def flop_counts(model_cfg: ModelConfig) -> BackboneFlopCounts:
    """The FLOP-relevant parameter counts of the backbone ``model_cfg`` trains (built on the meta device:
    no memory, so the 7B counts cost nothing), with its LoRA factors when it trains LoRA."""
    backbone = build_backbone(model_cfg, "meta")[0]
    if model_cfg.trainable == "lora":
        with torch.device("meta"):
            add_lora(backbone, rank=model_cfg.lora_rank, alpha=model_cfg.lora_alpha)
    else:
        backbone.requires_grad_(True)
    return backbone_flop_counts(backbone)


def run_deepspeed(model_cfg: ModelConfig, rows: list[dict], args, device: torch.device) -> dict:
    """One process under ``deepspeed.initialize`` (world size 1): the engine's own cost, without Ray."""
    if device.type == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rendezvous = dict(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    previous = {k: os.environ.get(k) for k in rendezvous}
    os.environ.update(rendezvous)
    try:
        return _time_deepspeed_engine(model_cfg, rows, args, device)
    finally:  # a one-process group must not leak into what runs next in this process (Ray workers)
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _time_deepspeed_engine(model_cfg: ModelConfig, rows: list[dict], args, device: torch.device) -> dict:
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    objective = StyleSFTObjective(model_cfg)
    module = objective.setup(device, args.precision)
    batches = device_batches(objective.collate_fn(), rows, args.micro_batch, device)
    params = [p for p in module.parameters() if p.requires_grad]
    config = build_deepspeed_config(args.zero_stage, args.micro_batch, 1, 1, args.precision)
    engine, *_ = deepspeed.initialize(
        model=module, optimizer=build_adamw(params, OptimizerConfig(lr=1e-4)), config=config
    )
    engine.train()

    def step(batch: dict) -> int:
        result = objective.compute(engine, batch)
        engine.backward(result.loss)
        engine.step()
        return result.tokens

    times, tokens = time_steps(step, batches, args.warmup + args.steps, device)
    dist.destroy_process_group()  # the engine and its memory go with this frame
    return {"step_s": statistics.median(times[args.warmup :]), "tokens": tokens}


def run_ray(model_cfg: ModelConfig, rows: list[dict], args) -> dict:
    """The project's Ray Train loop on ``--workers`` workers; step time from its per-step reports."""
    import ray

    from stylear_core.config import Resources
    from stylear_core.training.loop import RayTrainConfig, TrainLoopConfig, run_training
    from stylear_core.training.metrics import read_metrics_log

    if not ray.is_initialized():
        ray.init(address=args.ray_address, include_dashboard=False)
    steps = args.warmup + args.steps + 1
    # One report at the end: a report waits for the controller's poll, which would be timed as training.
    train = TrainLoopConfig(
        max_steps=steps,
        micro_batch_size=args.micro_batch,
        zero_stage=args.zero_stage,
        precision=args.precision,
        log_every=steps,
        checkpoint_every=steps,
        verify_frozen=False,
    )
    cluster = RayTrainConfig(
        num_workers=args.workers,
        worker=Resources(cpus=1, gpus=1.0 if torch.cuda.is_available() else 0.0),
        name="bench",
        max_failures=0,
    )
    # Few large blocks, as parquet shards give: a worker then fetches a block per many batches.
    dataset = ray.data.from_items(rows * max(1, args.workers)).repartition(args.workers).materialize()
    with tempfile.TemporaryDirectory(prefix="sar-bench-") as out:
        run_training(StyleSFTObjective(model_cfg), train, cluster, {"train": dataset}, out)
        log = read_metrics_log(Path(out) / "metrics.jsonl")
    timed = log[args.warmup : -1]  # the last step also checkpoints and exports
    per_worker_tokens = [r["tokens_per_s"] * r["seconds"] / args.workers for r in timed]
    return {
        "step_s": statistics.median(r["seconds"] for r in timed),
        "tokens": int(statistics.median(per_worker_tokens)),
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the runners, print the table, return (and optionally write) the results."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    on_gpu = torch.cuda.is_available()
    parser.add_argument("--preset", choices=("tiny", "lumina7b"), default="lumina7b" if on_gpu else "tiny")
    parser.add_argument("--image-size", type=int, default=None, help="px; 768 gives ~2.4k tokens per row")
    parser.add_argument("--zero-stage", type=int, choices=(2, 3), default=2)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers (1 per GPU)")
    parser.add_argument("--runners", default="plain,plain_masked,deepspeed,ray")
    parser.add_argument(
        "--checkpointing",
        type=checkpointing_setting,
        default=True,
        help="model.gradient_checkpointing: true, false, or the fraction of decoder layers to recompute",
    )
    parser.add_argument("--ray-address", default="local")
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads of the in-process runners (Ray workers get 1)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    apply_project_env()  # offline hubs, loopback Ray, DeepSpeed's op cache inside the project

    device = torch.device("cuda" if on_gpu else "cpu")
    if not on_gpu:
        torch.set_num_threads(args.threads)  # as many threads as a 1-CPU Ray worker, for a fair ratio
    args.precision = "bf16" if on_gpu else "fp32"
    size = args.image_size or (768 if args.preset == "lumina7b" else 64)
    model_cfg = ModelConfig(
        preset=args.preset,
        image_size=size,
        num_style_tokens=16 if args.preset == "lumina7b" else 4,
        gradient_checkpointing=args.checkpointing,
        dtype="bfloat16" if on_gpu else "float32",
    )
    model_cfg.validate()
    rows = synthetic_rows(model_cfg, args.micro_batch * 4, micro_batch=args.micro_batch)
    peak, peak_source = peak_flops(device)
    runners = [r for r in args.runners.split(",") if r]
    results: dict[str, dict] = {}
    for runner in runners:
        if runner == "plain" and "plain_masked" in runners:  # both layouts, step by step on one model
            results[runner] = run_plain(model_cfg, rows, args, device, interleave_masked=True)
            masked = {"step_s": results[runner].pop("masked_step_s"), "tokens": results[runner]["tokens"]}
        elif runner == "plain":
            results[runner] = run_plain(model_cfg, rows, args, device)
        elif runner == "plain_masked" and "plain" in runners:
            continue  # timed with plain, interleaved
        elif runner == "plain_masked":
            masked_cfg = dataclasses.replace(model_cfg, padding_free=False)
            results[runner] = run_plain(masked_cfg, rows, args, device)
        elif runner == "plain_features":  # its own on-the-fly baseline, steps interleaved
            on_the_fly, results[runner] = run_plain_features(model_cfg, rows, args, device)
        elif runner == "deepspeed":
            results[runner] = run_deepspeed(model_cfg, rows, args, device)
        elif runner == "ray":
            results[runner] = run_ray(model_cfg, rows, args)
        else:
            raise SystemExit(f"unknown runner {runner!r}")
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()
    if "plain" in results and "plain_masked" in runners:
        results = {"plain": results["plain"], "plain_masked": masked, **results}
    counts = flop_counts(model_cfg)
    checkpointed = len(model_cfg.checkpointed_layers(counts.layers))
    lengths = [len(r["prompt_ids"]) + len(r["image_tokens"]) for r in rows]
    flops = training_step_flops(counts, lengths, checkpointed)  # all rows; per token below
    seq = max(lengths)
    print(
        f"preset {args.preset}, image {size}px, rows of {min(lengths)}-{seq} tokens (mixed prompt lengths), "
        f"micro-batch {args.micro_batch}, ZeRO-{args.zero_stage}, {args.precision}, {model_cfg.trainable}, "
        f"checkpointing {checkpointed}/{counts.layers} layers; peak = {peak_source} ({peak / 1e12:.3g} TFLOP/s)"
    )
    print(
        f"  N = {counts.compute_params / 1e6:.2f}M computing backbone params (embedding table excluded, "
        f"LM head included), N_train = {counts.trainable_params / 1e6:.3f}M, L = {counts.layers}, "
        f"d = {counts.hidden}, S = each row's real tokens"
    )
    print("  tokens/s = real prompt + image tokens per step (pads not counted) / median step time")
    print(f"  MFU = [{MODEL_FLOPS_FORMULA}] per second / peak")
    print(f"  HFU = [{HARDWARE_FLOPS_FORMULA}] per second / peak")
    for r in results.values():
        r["tokens_per_s"] = r["tokens"] / r["step_s"]
        r["mfu"] = flops.model / flops.tokens * r["tokens_per_s"] / peak
        r["hfu"] = flops.hardware / flops.tokens * r["tokens_per_s"] / peak
    plain = results.get("plain", {}).get("tokens_per_s", float("nan"))
    for runner, r in results.items():
        r["vs_plain"] = r["tokens_per_s"] / plain
        print(
            f"  {runner:12s} {r['step_s'] * 1e3:9.1f} ms/step  {r['tokens_per_s']:10.1f} tok/s  "
            f"MFU {100 * r['mfu']:5.1f}%  HFU {100 * r['hfu']:5.1f}%  x{r['vs_plain']:.3f} of plain"
            + (f"  peak {r['peak_mem_gb']:.1f} GB" if "peak_mem_gb" in r else "")
        )
    if "plain" in results and "plain_masked" in results:
        free, masked = results["plain"]["step_s"], results["plain_masked"]["step_s"]
        print(
            f"  padding-free vs masked attention (plain loop, same model and rows, steps interleaved): "
            f"{free * 1e3:.1f} vs "
            f"{masked * 1e3:.1f} ms/step, x{masked / free:.3f} speed-up"
        )
    if "plain_features" in results:
        live, cached = on_the_fly["step_s"], results["plain_features"]["step_s"]
        print(
            f"  style features on the fly (vq_decode: VQGAN decode + CLIP every step) vs precomputed once "
            f"(plain loop, same model and rows, steps interleaved): {live * 1e3:.1f} vs {cached * 1e3:.1f} "
            f"ms/step, x{live / cached:.3f} speed-up; the precompute took "
            f"{results['plain_features']['precompute_s'] * 1e3:.1f} ms per row, once"
        )
    summary = {
        "preset": args.preset,
        "seq": seq,
        "row_lengths": lengths,
        "zero_stage": args.zero_stage,
        "flop_counts": dataclasses.asdict(counts),
        "checkpointed_layers": checkpointed,
        "step_flops": dataclasses.asdict(flops),
        "results": results,
    }
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()

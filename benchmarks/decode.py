"""Decode benchmark: the engine (static KV cache, batched CFG, CUDA graph on GPU) vs transformers ``generate``.

    python benchmarks/decode.py --preset tiny --device cpu              # seconds, CPU
    python benchmarks/decode.py --preset lumina7b --device cuda         # random 7B weights, one GPU
    python benchmarks/decode.py --json decode.json                      # also write every figure as JSON

For each batch of ``N`` images (``2N`` rows with CFG) it prints, on the same model in the same run:

* engine ms per decode step (whole-image wall time over the image's generated positions; prefill and
  VQ-free, so for a 768 px image mid-image steps dominate) and images/s;
* transformers ``generate`` (dynamic cache, ``2N`` rows, sampling) ms per step over ``--hf-steps``
  new tokens, and the images/s that implies;
* the weights-read floor: bytes of weights each step must read (all but the embedding table) over
  the device copy bandwidth measured here, and the weights + KV-cache floor at mid-image;
* mid-image ms per step: the serving loop (:class:`ContinuousBatchingEngine`, ``2N`` slots, ``N`` guided
  requests of this size submitted together) stepped to mid-image, then ``--mid-steps`` further
  ``step()`` calls timed (a window centred on the image's middle token; best of ``--repeats`` consecutive
  windows). A step here is the whole serving step: sampling with CFG, host bookkeeping and one eager
  forward (that loop has no CUDA graphs yet), with no prefill and none of the cheap early steps in it;
* the same mid-image figure with a LoRA adapter in use (``--lora-rank R``, 0 skips it): the backbone
  behind a :class:`MultiLoraPool` (capacity 1, max rank ``R``, gather mode) holding one random adapter,
  every row on it. The pool converts the backbone's linears in place, so every base figure (engine,
  ``generate``, mid-image) of every batch is measured first, on the unconverted model, and the LoRA
  figures after;

then the ratios: engine speed-up over ``generate``, engine time over each floor (``x floor``, ``x fl+KV``:
1.0 = at the floor), the mid-image step's fraction of the weights+KV roofline (``mid_roofline_fraction`` =
floor ms / mid ms: 1.0 = at the roofline, the figure the ">= 0.70 at 16 images" goal reads) and the LoRA
overhead (mid-image ms with the adapter / without).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stylear_core.data.layout import ImageTokenLayout  # noqa: E402
from stylear_core.data.tokenizer import text_prompt_ids  # noqa: E402
from stylear_core.inference.continuous import ContinuousBatchingEngine  # noqa: E402
from stylear_core.inference.engine import GenerationRequest, ImageGenerationEngine  # noqa: E402
from stylear_core.inference.multi_lora import MultiLoraPool  # noqa: E402
from stylear_core.models.presets import ModelConfig, build_backbone, build_prompt_tokenizer  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, megabytes: int, repeats: int = 5) -> float:
    """Device memory bandwidth in bytes/s from timing ``dst.copy_(src)`` (bytes read + written / time)."""
    numel = megabytes * 2**20 // 4
    src = torch.ones(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best


def streamed_weight_bytes(lm: torch.nn.Module) -> int:
    """Bytes one decode step reads from weights: every parameter except the embedding table (one row is read)."""
    embedding = lm.get_input_embeddings().weight
    return sum(p.numel() * p.element_size() for p in lm.parameters() if p is not embedding)


def kv_bytes(lm: torch.nn.Module, rows: int, positions: int, element_size: int) -> int:
    """Bytes of K and V cache all layers read at one step with ``positions`` cached tokens per row."""
    cfg = lm.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * rows * positions * cfg.num_key_value_heads * head_dim * element_size


def time_engine(engine: ImageGenerationEngine, requests: list[GenerationRequest], repeats: int) -> float:
    """Best wall time of generating ``requests`` together (after one warm-up that also captures graphs)."""
    engine.generate(requests)
    best = float("inf")
    for _ in range(repeats):
        synchronize(engine.device)
        start = time.perf_counter()
        engine.generate(requests)
        synchronize(engine.device)
        best = min(best, time.perf_counter() - start)
    return best


def time_hf_generate(lm: torch.nn.Module, prompt: list[int], rows: int, steps: int, top_k: int) -> float:
    """Seconds per new token of ``lm.generate`` on ``rows`` copies of ``prompt`` (sampling, no early stop)."""
    device = next(lm.parameters()).device
    ids = torch.tensor([prompt] * rows, device=device)
    kwargs = dict(
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=True,
        top_k=top_k,
        temperature=1.0,
        pad_token_id=lm.config.pad_token_id,
    )
    with torch.inference_mode():
        lm.generate(ids, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})
        synchronize(device)
        start = time.perf_counter()
        lm.generate(ids, **kwargs)
        synchronize(device)
    return (time.perf_counter() - start) / steps


def release_decoders(engine: ImageGenerationEngine) -> None:
    """Drop the engine's cached decoders (KV cache + graph) before a pool allocates its own cache.

    At 768 px a 32-row cache of the 7B model is ~40 GB: the engine's and a pool's together do not fit
    beside the weights on an 80 GB card.
    """
    engine._decoders.clear()
    gc.collect()
    if engine.device.type == "cuda":
        torch.cuda.empty_cache()


def time_mid_image(
    engine: ImageGenerationEngine,
    requests: list[GenerationRequest],
    mid_steps: int,
    repeats: int,
    adapter: int = 0,
    row_adapters: Callable[[torch.Tensor], None] | None = None,
) -> float:
    """Best seconds per :meth:`ContinuousBatchingEngine.step` over ``mid_steps`` steps at mid-image.

    A pool of two slots per request (cache sized by ``columns_needed``) takes every request at once
    (same size, guided, on ``adapter``), is stepped until ``repeats`` consecutive windows of
    ``mid_steps`` steps are centred on the image's middle token, and each window is timed (the device
    synchronised around it). Copies of the requests are cancelled afterwards and the pool dropped.
    """
    release_decoders(engine)
    probe = ContinuousBatchingEngine(engine, 2, 1)  # columns_needed only reads the engine
    layout = engine.validate(requests[0])
    cache_len = max(probe.columns_needed(r, layout) for r in requests)
    pool = ContinuousBatchingEngine(engine, 2 * len(requests), cache_len, row_adapters=row_adapters)
    # Copies: cancelling a handle sets its request's cancel event, and the callers reuse their requests.
    handles = [pool.submit(dataclasses.replace(r, cancel=None), adapter=adapter) for r in requests]
    timed = mid_steps * repeats
    # tokens_done is 3 (the header) + the steps taken; the first step admits and prefills: never timed,
    # and no request may finish inside a window (its last step feeds nothing).
    start_at = max(4, layout.num_tokens // 2 - timed // 2)
    if start_at + timed > layout.num_tokens - 1:
        raise ValueError(f"{timed} timed steps do not fit in an image of {layout.num_tokens} tokens")
    for _ in range(layout.num_tokens):  # bounded: one token per step
        if handles[0].tokens_done >= start_at:
            break
        pool.step()
    reached = handles[0].tokens_done
    best = float("inf")
    for _ in range(repeats):
        synchronize(engine.device)
        start = time.perf_counter()
        for _ in range(mid_steps):
            pool.step()
        synchronize(engine.device)
        best = min(best, time.perf_counter() - start)
    # The pool turns an exception in a step into failed requests: a failed run must not read as fast.
    for handle in handles:
        if handle.status != "running" or handle.tokens_done != reached + timed:
            raise RuntimeError(
                f"a mid-image request is {handle.status!r} at token {handle.tokens_done}, "
                f"expected running at {reached + timed}"
            ) from handle.error
    for handle in handles:
        handle.cancel()
    pool.step()  # retires the cancelled requests
    del pool, probe
    release_decoders(engine)
    return best / mid_steps


def random_adapter(pool: MultiLoraPool, rank: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A peft-style LoRA state dict of rank ``rank`` for every target layer of ``pool``.

    ``A ~ N(0, 1/in)`` keeps the rank-``r`` hidden of unit-variance inputs near unit variance; ``B`` is
    small but non-zero: the adapter changes the outputs, and they stay finite in bf16.
    """
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, layer in pool.layers.items():
        a = torch.randn(rank, layer.in_features, generator=generator) / layer.in_features**0.5
        state[f"{name}.lora_A.weight"] = a
        state[f"{name}.lora_B.weight"] = 1e-3 * torch.randn(layer.out_features, rank, generator=generator)
    return state


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Run the benchmark and print the report; returns its rows as dicts (for tests)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=("tiny", "lumina7b"), default="tiny")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--size", type=int, default=None, help="image side in px (default: 256 tiny, 768 lumina7b)"
    )
    parser.add_argument("--images", default="1,8,16", help="comma-separated images per batch (rows = 2x)")
    parser.add_argument(
        "--hf-steps", type=int, default=None, help="new tokens timed for generate (default: 64)"
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--mid-steps", type=int, default=16, help="pool steps per timed mid-image window (default: 16)"
    )
    parser.add_argument(
        "--lora-rank", type=int, default=8, help="rank of the adapter in use for the LoRA figure (0: skip it)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--no-cuda-graphs", action="store_true")
    args = parser.parse_args(argv)
    if args.mid_steps < 1 or args.repeats < 1 or args.lora_rank < 0:
        parser.error("--mid-steps and --repeats must be at least 1, --lora-rank at least 0")

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible")
    size = args.size or (256 if args.preset == "tiny" else 768)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    cfg = ModelConfig(preset=args.preset, image_size=size, dtype=dtype)
    lm, vocab = build_backbone(cfg, device)
    lm.eval()
    tokenizer = build_prompt_tokenizer(cfg, vocab)
    # One cached decoder at a time: at 768 px a 32-row KV cache of the 7B model alone is ~40 GB.
    engine = ImageGenerationEngine(
        lm, vocab, device=device, cuda_graphs=not args.no_cuda_graphs, max_batch=64, max_cached_decoders=1
    )
    layout = ImageTokenLayout.for_resolution(size, size, vocab)
    steps = layout.num_tokens - 3  # positions the engine fills after the header
    prompt = text_prompt_ids(tokenizer, "a watercolour of a lighthouse on a cliff at dusk", size, size)
    hf_steps = args.hf_steps or min(64, steps)
    if args.mid_steps * args.repeats > layout.num_tokens - 5:
        parser.error(f"--mid-steps x --repeats must fit in the {layout.num_tokens - 5} steps after the first")

    bandwidth = copy_bandwidth(device, 1024 if device.type == "cuda" else 256)
    element = next(lm.parameters()).element_size()
    weights = streamed_weight_bytes(lm)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}; preset {args.preset}; {size}x{size} px = {layout.num_tokens} tokens/image")
    print(
        f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; weights read per step {weights / 1e9:.3f} GB "
        f"-> weights floor {weights / bandwidth * 1e3:.3f} ms/step"
    )
    header = (
        f"{'images':>6} {'rows':>4} | {'engine ms/step':>14} {'img/s':>8} | {'generate ms/step':>16} {'img/s':>8}"
        f" | {'floor ms':>8} {'+KV':>8} | {'speed-up':>8} {'x floor':>7} {'x fl+KV':>7}"
        f" | {'mid ms/step':>11} {'roofline':>8}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for images in [int(n) for n in args.images.split(",") if n.strip()]:
        requests = [
            GenerationRequest(prompt, size, size, cfg_scale=4.0, top_k=2000, temperature=1.0, seed=i)
            for i in range(images)
        ]
        wall = time_engine(engine, requests, args.repeats)
        engine_ms = wall / steps * 1e3
        hf_ms = time_hf_generate(lm, prompt, 2 * images, hf_steps, min(2000, vocab.vocab_size)) * 1e3
        floor_ms = weights / bandwidth * 1e3
        mid_positions = len(prompt) + 3 + steps // 2
        floor_kv_ms = (weights + kv_bytes(lm, 2 * images, mid_positions, element)) / bandwidth * 1e3
        mid_ms = time_mid_image(engine, requests, args.mid_steps, args.repeats) * 1e3
        row = {
            "images": images,
            "rows": 2 * images,
            "engine_ms_per_step": engine_ms,
            "engine_images_per_s": images / wall,
            "generate_ms_per_step": hf_ms,
            "generate_images_per_s": images / (hf_ms / 1e3 * steps),
            "floor_ms": floor_ms,
            "floor_kv_ms": floor_kv_ms,
            "speedup_vs_generate": hf_ms / engine_ms,
            "engine_over_floor": engine_ms / floor_ms,
            "engine_over_floor_kv": engine_ms / floor_kv_ms,
            "mid_ms_per_step": mid_ms,
            "mid_roofline_fraction": floor_kv_ms / mid_ms,
        }
        rows.append(row)
        print(
            f"{images:>6} {2 * images:>4} | {engine_ms:>14.3f} {row['engine_images_per_s']:>8.3f} | "
            f"{hf_ms:>16.3f} {row['generate_images_per_s']:>8.3f} | {floor_ms:>8.3f} {floor_kv_ms:>8.3f} | "
            f"{row['speedup_vs_generate']:>7.1f}x {row['engine_over_floor']:>6.2f}x {row['engine_over_floor_kv']:>6.2f}x"
            f" | {mid_ms:>11.3f} {row['mid_roofline_fraction']:>8.3f}"
        )
    print(
        "speed-up = generate ms/step / engine ms/step; x floor = engine ms/step / floor "
        "(1.0 = at the bandwidth limit). generate runs the 2N rows as one plain batch (no CFG combine).\n"
        f"mid ms/step = continuous-batching pool step (sampling + eager forward) over {args.mid_steps} steps "
        "centred on mid-image; roofline = floor+KV ms / mid ms/step (1.0 = at the weights+KV roofline)."
    )
    if args.lora_rank:
        # Converts the backbone's linears in place: only after every base figure above.
        adapters = MultiLoraPool(lm, capacity=1, max_rank=args.lora_rank)
        slot = adapters.load("benchmark", random_adapter(adapters, args.lora_rank))
        print(
            f"\nLoRA in use: rank {args.lora_rank} on {len(adapters.layers)} modules "
            f"({adapters.mode} mode), every row on it"
        )
        lora_header = f"{'images':>6} {'rows':>4} | {'mid ms/step':>11} {'+LoRA ms/step':>13} {'overhead':>8}"
        print(lora_header)
        print("-" * len(lora_header))
        for row in rows:
            requests = [
                GenerationRequest(prompt, size, size, cfg_scale=4.0, top_k=2000, temperature=1.0, seed=i)
                for i in range(row["images"])
            ]
            lora_s = time_mid_image(
                engine, requests, args.mid_steps, args.repeats, slot, row_adapters=adapters.set_rows
            )
            row["mid_lora_ms_per_step"] = lora_s * 1e3
            row["lora_overhead"] = row["mid_lora_ms_per_step"] / row["mid_ms_per_step"]
            print(
                f"{row['images']:>6} {row['rows']:>4} | {row['mid_ms_per_step']:>11.3f} "
                f"{row['mid_lora_ms_per_step']:>13.3f} {row['lora_overhead']:>7.2f}x"
            )
        print("overhead = mid-image ms/step with the adapter / without (same run; base measured first).")
    if args.json is not None:
        report = {
            "device": name,
            "preset": args.preset,
            "size": size,
            "bandwidth_gb_s": bandwidth / 1e9,
            "mid_steps": args.mid_steps,
            "lora_rank": args.lora_rank,
            "rows": rows,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()

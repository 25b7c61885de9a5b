"""Decode benchmark: the engine (static KV cache, batched CFG, CUDA graph on GPU) vs transformers ``generate``.

    python benchmarks/decode.py --preset tiny --device cpu              # seconds, CPU
    python benchmarks/decode.py --preset lumina7b --device cuda         # random 7B weights, one GPU

For each batch of ``N`` images (``2N`` rows with CFG) it prints, on the same model in the same run:

* engine ms per decode step (whole-image wall time over the image's generated positions; prefill and
  VQ-free, so for a 768 px image mid-image steps dominate) and images/s;
* transformers ``generate`` (dynamic cache, ``2N`` rows, sampling) ms per step over ``--hf-steps``
  new tokens, and the images/s that implies;
* the weights-read floor: bytes of weights each step must read (all but the embedding table) over
  the device copy bandwidth measured here, and the weights + KV-cache floor at mid-image;

then the ratios: engine speed-up over ``generate`` and engine time over each floor.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stylear_core.data.layout import ImageTokenLayout  # noqa: E402
from stylear_core.data.tokenizer import text_prompt_ids  # noqa: E402
from stylear_core.inference.engine import GenerationRequest, ImageGenerationEngine  # noqa: E402
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
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--no-cuda-graphs", action="store_true")
    args = parser.parse_args(argv)

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
        }
        rows.append(row)
        print(
            f"{images:>6} {2 * images:>4} | {engine_ms:>14.3f} {row['engine_images_per_s']:>8.3f} | "
            f"{hf_ms:>16.3f} {row['generate_images_per_s']:>8.3f} | {floor_ms:>8.3f} {floor_kv_ms:>8.3f} | "
            f"{row['speedup_vs_generate']:>7.1f}x {row['engine_over_floor']:>6.2f}x {row['engine_over_floor_kv']:>6.2f}x"
        )
    print(
        "speed-up = generate ms/step / engine ms/step; x floor = engine ms/step / floor "
        "(1.0 = at the bandwidth limit). generate runs the 2N rows as one plain batch (no CFG combine)."
    )
    return rows


if __name__ == "__main__":
    main()

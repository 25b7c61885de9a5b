"""Serving benchmark: continuous batching against batch-at-a-time decoding under Poisson arrivals.

    python benchmarks/serving.py --preset tiny --device cpu
    python benchmarks/serving.py --preset tiny --rates 20,40 --requests 32 --repeats 2

Requests (random prompts, guidance 4, sampled, image sides drawn from ``--sizes``) arrive at the given
rates (images/s, exponential gaps, one fixed arrival sequence per rate and repeat). Three schedulers
serve the same arrivals on the same model, interleaved run by run so machine load hits them alike:

* ``generate``: today's path. Whatever has arrived (up to ``--slots / 2`` images) goes to one
  :meth:`ImageGenerationEngine.generate` call; arrivals wait for it to return.
* ``batch``: :class:`ContinuousBatchingEngine` with ``policy="batch"`` (admits only into an empty pool).
* ``continuous``: the same engine admitting into free slots between decode steps.

For each rate it prints images/s (requests over first arrival to last finish) and p50/p99 latency
(arrival to result) of each scheduler, then the ratios of ``continuous`` to the other two. Without
``--rates`` the rates are set from the measured time of one full batch of mixed sizes: 0.6x and 2.5x
of that capacity, i.e. a load every scheduler keeps up with and one where batch-at-a-time queues (a
full batch overstates what ``generate`` sustains: it decodes each resolution of a batch separately).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stylear_core.data.layout import ImageTokenLayout  # noqa: E402
from stylear_core.inference.continuous import ContinuousBatchingEngine  # noqa: E402
from stylear_core.inference.engine import GenerationRequest, ImageGenerationEngine  # noqa: E402
from stylear_core.models.presets import ModelConfig, build_backbone  # noqa: E402

SCHEDULERS = ("generate", "batch", "continuous")


def make_requests(vocab, sizes: Sequence[int], count: int, seed: int) -> list[GenerationRequest]:
    """``count`` guided, sampled requests with random prompts of 8-40 tokens and sides from ``sizes``."""
    rng = random.Random(seed)
    low = vocab.style_placeholder + 1
    out = []
    for i in range(count):
        side = rng.choice(list(sizes))
        ids = [vocab.bos] + [rng.randrange(low, vocab.vocab_size) for _ in range(rng.randint(8, 40))]
        out.append(GenerationRequest(ids, side, side, cfg_scale=4.0, top_k=2000, seed=seed * 1000 + i))
    return out


def poisson_arrivals(rate: float, count: int, seed: int) -> list[float]:
    """Arrival times (s from the start) with exponential gaps of mean ``1 / rate``."""
    rng = random.Random(seed)
    t, times = 0.0, []
    for _ in range(count):
        times.append(t)
        t += rng.expovariate(rate)
    return times


def serve_generate(
    engine: ImageGenerationEngine, requests: list[GenerationRequest], arrivals: list[float], max_batch: int
) -> list[float]:
    """Today's path: each ``generate`` call takes what has arrived (up to ``max_batch``). Returns latencies."""
    start = time.perf_counter()
    latencies = [0.0] * len(requests)
    queue: deque[int] = deque()
    nxt = 0
    while nxt < len(requests) or queue:
        now = time.perf_counter() - start
        while nxt < len(requests) and arrivals[nxt] <= now:
            queue.append(nxt)
            nxt += 1
        if not queue:
            time.sleep(min(0.01, max(arrivals[nxt] - now, 0.0)))
            continue
        batch = [queue.popleft() for _ in range(min(max_batch, len(queue)))]
        engine.generate([requests[i] for i in batch])
        done = time.perf_counter() - start
        for i in batch:
            latencies[i] = done - arrivals[i]
    return latencies


def serve_pool(
    pool: ContinuousBatchingEngine, requests: list[GenerationRequest], arrivals: list[float]
) -> list[float]:
    """Drive ``pool`` step by step, submitting each request at its arrival time. Returns latencies."""
    start = time.perf_counter()
    handles = []
    nxt = 0
    while nxt < len(requests) or not pool.idle:
        now = time.perf_counter() - start
        while nxt < len(requests) and arrivals[nxt] <= now:
            handles.append(pool.submit(requests[nxt]))
            nxt += 1
        if pool.idle:
            time.sleep(min(0.01, max(arrivals[nxt] - now, 0.0)))
            continue
        pool.step()
    return [h.finished_at - start - a for h, a in zip(handles, arrivals)]


def summarize(latencies: list[float], arrivals: list[float]) -> dict[str, float]:
    """Images/s over first arrival to last finish, and p50/p99 latency in seconds."""
    ends = [a + lat for a, lat in zip(arrivals, latencies)]
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "images_per_s": len(latencies) / (max(ends) - arrivals[0]),
        "p50_s": statistics.median(latencies),
        "p99_s": p99,
    }


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Run the benchmark and print the report; returns one dict per rate (for tests)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=("tiny", "lumina7b"), default="tiny")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--sizes", default="32,64,128", help="comma-separated image sides in px to draw from")
    parser.add_argument("--slots", type=int, default=8, help="pool rows (two per guided image)")
    # Enough that a run is mostly steady state: with 32, ramp-up and the drain of the last requests took
    # most of the first-arrival-to-last-finish window at the queueing rate, hiding the schedulers' capacity.
    parser.add_argument("--requests", type=int, default=96, help="requests per run")
    parser.add_argument(
        "--rates", default="", help="comma-separated arrival rates in images/s (default: measured)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs per scheduler and rate (interleaved)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    cfg = ModelConfig(preset=args.preset, image_size=max(sizes), dtype=dtype)
    lm, vocab = build_backbone(cfg, device)
    engine = ImageGenerationEngine(
        lm.eval(), vocab, device=device, cuda_graphs=False, max_batch=args.slots // 2
    )
    longest = ImageTokenLayout.for_resolution(max(sizes), max(sizes), vocab).num_tokens
    cache_len = 64 + longest  # prompts of up to 40 tokens + header, rounded up to the length bucket
    pools = {
        policy: ContinuousBatchingEngine(engine, args.slots, cache_len, policy=policy)
        for policy in ("batch", "continuous")
    }
    images = args.slots // 2

    # Warm-up, and the batch path's capacity: one full batch of mixed sizes, all at once.
    warm = make_requests(vocab, sizes, images, seed=999)
    serve_pool(pools["continuous"], warm, [0.0] * images)
    serve_generate(engine, warm, [0.0] * images, images)
    t0 = time.perf_counter()
    serve_pool(pools["batch"], warm, [0.0] * images)
    capacity = images / (time.perf_counter() - t0)
    rates = [float(r) for r in args.rates.split(",") if r.strip()] or [0.6 * capacity, 2.5 * capacity]

    tokens = {s: ImageTokenLayout.for_resolution(s, s, vocab).num_tokens for s in sizes}
    print(
        f"device {args.device}; preset {args.preset}; sides {sizes} px = {list(tokens.values())} tokens; "
        f"{args.slots} slots ({images} guided images); {args.requests} requests x {args.repeats} runs per rate; "
        f"batch path capacity ~{capacity:.1f} img/s"
    )
    header = f"{'rate/s':>7} | " + " | ".join(f"{name:>10} img/s   p50 s   p99 s" for name in SCHEDULERS)
    print(header)
    print("-" * len(header))
    report = []
    for r_index, rate in enumerate(rates):
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in SCHEDULERS}
        for rep in range(args.repeats):
            seed = 100 * r_index + rep
            requests = make_requests(vocab, sizes, args.requests, seed)
            arrivals = poisson_arrivals(rate, args.requests, seed)
            # Alternate the order so a load change in the machine does not always hit the same scheduler.
            order = SCHEDULERS if rep % 2 == 0 else SCHEDULERS[::-1]
            for name in order:
                if name == "generate":
                    latencies = serve_generate(engine, requests, arrivals, images)
                else:
                    latencies = serve_pool(pools[name], requests, arrivals)
                runs[name].append(summarize(latencies, arrivals))
        row: dict = {"rate": rate}
        for name in SCHEDULERS:
            for key in ("images_per_s", "p50_s", "p99_s"):
                row[f"{name}_{key}"] = statistics.mean(run[key] for run in runs[name])
        for base in ("generate", "batch"):
            row[f"throughput_vs_{base}"] = row["continuous_images_per_s"] / row[f"{base}_images_per_s"]
            row[f"p50_vs_{base}"] = row["continuous_p50_s"] / row[f"{base}_p50_s"]
            row[f"p99_vs_{base}"] = row["continuous_p99_s"] / row[f"{base}_p99_s"]
        report.append(row)
        cells = " | ".join(
            f"{row[f'{n}_images_per_s']:16.2f} {row[f'{n}_p50_s']:7.3f} {row[f'{n}_p99_s']:7.3f}"
            for n in SCHEDULERS
        )
        print(f"{rate:7.1f} | {cells}")
    print()
    for row in report:
        print(
            f"rate {row['rate']:.1f}/s: continuous vs generate: images/s x{row['throughput_vs_generate']:.2f}, "
            f"p50 x{row['p50_vs_generate']:.2f}, p99 x{row['p99_vs_generate']:.2f}; "
            f"vs batch policy: images/s x{row['throughput_vs_batch']:.2f}, p50 x{row['p50_vs_batch']:.2f}, "
            f"p99 x{row['p99_vs_batch']:.2f}"
        )
    return report


if __name__ == "__main__":
    main()

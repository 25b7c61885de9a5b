"""What an idle thread that once ran torch costs the rest of the process, same run.

    python benchmarks/idle_torch_thread.py [--threads 2] [--steps 60]

The workload is the miniature VQGAN's training (:func:`train_vqgan`, 64 images, ``--steps`` steps) on
``--threads`` threads in the main thread, each side in a fresh process:

- ``alone``: nothing else ran torch;
- ``idle thread``: a second thread ran a few convolutions and matmuls first and is still alive, waiting
  (as the serving model's decode loop and preparation worker wait between requests);
- ``thread ended``: the same thread ran the same work and returned before the workload.

The likely cause, which the busy cores agree with: libgomp gives each thread that starts a parallel
region its own team, and while more of its threads exist than cores it stops spinning between parallel
regions, so a workload of many small ops pays a futex wake-up per op. The ratio against ``alone`` is what a model built outside Serve and never closed
(``StyleARModelDeployment.close``) costs every later test in the process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time

SIDES = ("alone", "idle thread", "thread ended")


def _side(side: str, threads: int, steps: int) -> dict:
    import torch

    from stylear_core.miniature.vqgan_training import VQGANTrainingConfig, train_vqgan
    from stylear_core.miniature.world import _random_images
    from stylear_core.models.vqgan import mini_vqgan_config, random_vqgan

    torch.set_num_threads(1)
    release, ran = threading.Event(), threading.Event()

    def other() -> None:
        x, w = torch.randn(8, 3, 64, 64), torch.randn(16, 3, 3, 3)
        for _ in range(20):
            torch.nn.functional.conv2d(x, w)
            torch.randn(256, 256) @ torch.randn(256, 256)
        ran.set()
        if side == "idle thread":
            release.wait()

    if side != "alone":
        worker = threading.Thread(target=other, daemon=True)
        worker.start()
        ran.wait()
        if side == "thread ended":
            worker.join()
    torch.set_num_threads(threads)
    vq = random_vqgan(mini_vqgan_config(), seed=0)
    images, weights = _random_images(0, 64, "vqgan", 0.0)
    config = VQGANTrainingConfig(
        steps=steps, batch_size=16, full_image_steps=steps // 3, full_image_batch_size=4, warmup_steps=5
    )
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    train_vqgan(vq, images, config, weights=weights)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    release.set()
    return {"seconds": seconds, "cores_busy": cpu / seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # one side, in its own process
    args = parser.parse_args(argv)
    if args.side:
        print(json.dumps(_side(args.side, args.threads, args.steps)))
        return
    results = {}
    for side in SIDES:
        command = [sys.executable, __file__, "--side", side, "--threads", str(args.threads)]
        done = subprocess.run([*command, "--steps", str(args.steps)], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{side}: exit {done.returncode}\n{done.stderr[-2000:]}")
        results[side] = json.loads(done.stdout.strip().splitlines()[-1])
        got = results[side]
        print(f"{side:>12}: {got['seconds']:.1f} s, {got['cores_busy']:.2f} cores busy", flush=True)
    alone = results["alone"]["seconds"]
    for side in SIDES[1:]:
        print(f"{side} / alone: {results[side]['seconds'] / alone:.2f}x the time")


if __name__ == "__main__":
    main()

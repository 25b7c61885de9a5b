"""The miniature VQGAN's autoencoder warm start against quantizing from the first step, same run.

    python benchmarks/vqgan_warm_start.py                       # the quality gate's cut-down world
    python benchmarks/vqgan_warm_start.py --images 2000 --warm-steps 1200   # make demo's world

Both sides train a fresh VQGAN (same seed, same images) with :func:`train_vqgan` on this process's
threads (``--threads``, default every core) and are scored on the same held-out procedural images:
PSNR, codes used and training seconds, then the ratios. The baseline is the cut-down worlds' former
recipe (whole-image batches of 8); the warm side skips the codebook for ``--autoencoder-steps`` and
uses whole-image batches of 4.
"""

from __future__ import annotations

import argparse
import os

import torch

from stylear_core.data.images import to_tensor
from stylear_core.miniature.judges import procedural_images
from stylear_core.miniature.vqgan_training import VQGANTrainingConfig, psnr, train_vqgan
from stylear_core.miniature.world import _random_images
from stylear_core.models.vqgan import mini_vqgan_config, random_vqgan


def _side(name: str, config: VQGANTrainingConfig, images, weights, held) -> dict:
    vq = random_vqgan(mini_vqgan_config(), seed=0)
    stats = train_vqgan(vq, images, config, weights=weights)
    with torch.no_grad():
        codes = vq.encode(held)
        score = psnr(held, vq.decode(codes))
    print(
        f"{name:>9}: {score:.2f} dB, {codes.unique().numel()} codes used, {stats.seconds:.0f} s", flush=True
    )
    return {"psnr": score, "seconds": stats.seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--images", type=int, default=512, help="training images (the gate: 512, the demo: 2000)"
    )
    parser.add_argument("--steps", type=int, default=1000, help="baseline steps")
    parser.add_argument("--warm-steps", type=int, default=1000, help="warm-start side's steps")
    parser.add_argument("--autoencoder-steps", type=int, default=300)
    parser.add_argument("--held", type=int, default=256, help="held-out images scored")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    images, weights = _random_images(0, args.images, "vqgan")
    held = to_tensor(procedural_images(1000, args.held)[0])
    common = dict(batch_size=16, full_image_steps=300, warmup_steps=20, lr=0.003)
    base = _side(
        "baseline",
        VQGANTrainingConfig(steps=args.steps, full_image_batch_size=8, **common),
        images,
        weights,
        held,
    )
    warm = _side(
        "warm",
        VQGANTrainingConfig(
            steps=args.warm_steps, full_image_batch_size=4, autoencoder_steps=args.autoencoder_steps, **common
        ),
        images,
        weights,
        held,
    )
    print(
        f"warm - baseline: {warm['psnr'] - base['psnr']:+.2f} dB;"
        f" time warm / baseline: {warm['seconds'] / base['seconds']:.2f}"
    )


if __name__ == "__main__":
    main()

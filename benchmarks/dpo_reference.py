"""DPO step time with the live reference model against reference log-probs stored with the pairs.

    python benchmarks/dpo_reference.py                      # CPU, tiny preset, ~half a minute
    python benchmarks/dpo_reference.py --steps 20 --micro-batch 4

Both runners train the same DPO step (:class:`~stylear_core.training.objectives.StyleDPOObjective`: frozen
CLIP on the style reference, resampler, policy LoRA log-probs of chosen and rejected, sigmoid DPO loss,
torch AdamW) on the same synthetic pairs from the same SFT adapter:

* ``live``: the frozen reference adapter runs a no-grad forward of all ``2B`` sequences every step;
* ``cached``: the reference log-probs were scored once before timing
  (:class:`~stylear_core.preferences.reference.ReferenceLogProbScorer`; the time is printed) and the step
  reads them from the batch.

Steps alternate between the runners (the order flips every step), so load on a shared machine hits both
alike. Prints the median step after ``--warmup`` steps, backbone forwards per step, the one-off scoring
time and ``cached / live``; returns them as a dict.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stylear_core.config import load_config  # noqa: E402
from stylear_core.preferences.reference import ReferenceLogProbScorer  # noqa: E402
from stylear_core.testing.fixtures import numpy_batch, tiny_adapter  # noqa: E402
from stylear_core.training.objectives import StyleDPOObjective  # noqa: E402
from stylear_core.training.stages import StyleTrainConfig  # noqa: E402
from stylear_core.training.synthetic_shards import synthetic_preference_table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def numpy_batches(table: pa.Table, micro_batch: int) -> list[dict[str, np.ndarray]]:
    """Micro-batches of ``table`` as Ray Data hands them to the collate (object arrays for lists)."""
    out = []
    for start in range(0, table.num_rows - micro_batch + 1, micro_batch):
        out.append(numpy_batch(table.slice(start, micro_batch)))
    return out


class Runner:
    """One DPO objective set up on the CPU with its own AdamW and a backbone-forward counter."""

    def __init__(self, model_cfg, adapter: Path, mode: str, noise: float, lr: float = 1e-3):
        self.objective = StyleDPOObjective(
            model_cfg, str(adapter), noise_strength=noise, reference_logps=mode
        )
        self.module = self.objective.setup(torch.device("cpu"), "fp32")
        self.module.train()
        params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr)
        self.forwards = 0
        self.module.backbone.register_forward_hook(self._count)
        self.collate = self.objective.collate_fn()
        self.times: list[float] = []
        self.losses: list[float] = []

    def _count(self, *_) -> None:
        self.forwards += 1

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        """One timed optimizer step on a collated batch."""
        start = time.perf_counter()
        result = self.objective.compute(self.module, batch)
        result.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.times.append(time.perf_counter() - start)
        self.losses.append(float(result.loss.detach()))


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark from ``argv``; returns the figures it prints."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=16, help="preference pairs (cycled)")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per runner")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--noise", type=float, default=0.0, help="style-noise strength of DPO")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model_cfg = load_config(StyleTrainConfig, REPO / "jobs/configs/train_style/tiny.yaml").model
    with tempfile.TemporaryDirectory(prefix="dpo-ref-bench-") as tmp:
        adapter = tiny_adapter(Path(tmp) / "sft", model_cfg, perturb=("lora",), seed=1)
        table = synthetic_preference_table(model_cfg, args.rows)
        start = time.perf_counter()
        scored = ReferenceLogProbScorer(model_cfg, str(adapter), args.noise, device="cpu")(table)
        scoring_s = time.perf_counter() - start
        runners = {
            "live": Runner(model_cfg, adapter, "live", args.noise),
            "cached": Runner(model_cfg, adapter, "cached", args.noise),
        }
        batches = numpy_batches(scored, args.micro_batch)
        collated = {name: [r.collate(b) for b in batches] for name, r in runners.items()}
        total = args.warmup + args.steps
        for i in range(total):
            order = ("live", "cached") if i % 2 == 0 else ("cached", "live")
            for name in order:
                runners[name].step(collated[name][i % len(batches)])
    results = {}
    for name, r in runners.items():
        timed = r.times[args.warmup :]
        results[name] = {
            "step_s": statistics.median(timed),
            "backbone_forwards_per_step": r.forwards / total,
            "first_loss": r.losses[0],
        }
    ratio = results["cached"]["step_s"] / results["live"]["step_s"]
    summary = {
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "rows": args.rows,
        "micro_batch": args.micro_batch,
        "steps": args.steps,
        "noise_strength": args.noise,
        "scoring_s": scoring_s,
        "scoring_s_per_pair": scoring_s / args.rows,
        "results": results,
        "cached_over_live": ratio,
    }
    print(
        f"DPO step, tiny preset, CPU ({torch.get_num_threads()} threads), micro-batch {args.micro_batch}, "
        f"median of {args.steps} steps:"
    )
    for name, r in results.items():
        print(
            f"  {name:7s} {r['step_s'] * 1e3:8.1f} ms/step   backbone forwards/step "
            f"{r['backbone_forwards_per_step']:.0f}   first loss {r['first_loss']:.6f}"
        )
    print(f"  cached / live step time: {ratio:.3f}  (live / cached: {1 / ratio:.2f}x)")
    print(f"  one-off reference scoring: {scoring_s:.2f} s for {args.rows} pairs")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()

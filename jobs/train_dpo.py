"""DPO post-training of the StyleAR SFT model on preference pairs, on Ray Train + DeepSpeed ZeRO.

Takes preference pairs (``stylear.preference_pairs/1`` parquet) and the SFT artefact (its manifest
names the model block unless ``model`` is set). The policy LoRA starts from the SFT LoRA and trains
with the sigmoid DPO loss (``dpo.beta``) on summed image-token log-probs, against the SFT model as
reference: its log-probs stored with the pairs (``dpo.reference_logps``: ``cached``, ``auto``, or
``precompute``, which scores pairs lacking them once before training) or a frozen reference adapter
holding the SFT factors on the same base weights, run every step (``live``). Gives ``<output_dir>/adapter/`` (the DPO
policy's LoRA + resampler, probe, manifest), ``<output_dir>/metrics.jsonl`` (loss, reward margin,
accuracy, ...) and ``<output_dir>/manifest.json``.
A complete output dir (manifest complete) is skipped on rerun (``force=true`` runs it anyway).

    python -m jobs.train_dpo --config jobs/configs/train_dpo/tiny.yaml [key=value ...]
"""

from __future__ import annotations

from stylear_core.stages import run_stage
from stylear_core.training.stages import TRAIN_DPO_FORMAT, DPOLossConfig, DPOTrainConfig, run_dpo_training

FORMAT = TRAIN_DPO_FORMAT
Config = DPOTrainConfig
__all__ = ["FORMAT", "Config", "DPOLossConfig", "main"]


def main(argv: list[str] | None = None) -> dict:
    """Run the DPO stage from ``argv`` (``--config FILE key=value ...``); returns its summary."""
    return run_stage(Config, run_dpo_training, argv, name="train_dpo", fmt=FORMAT, description=__doc__)


if __name__ == "__main__":
    main()

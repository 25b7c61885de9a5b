"""Training on Ray Train + DeepSpeed ZeRO: style-token SFT, preference pairs and DPO.

* :mod:`~stylear_core.training.loop`: the ``TorchTrainer`` driver (:func:`run_training`) and the worker
  loop (DeepSpeed engine, gradient accumulation, reports, checkpoints, resume, failure injection);
* :mod:`~stylear_core.training.objectives`: what a step computes (:class:`StyleSFTObjective`,
  :class:`StyleDPOObjective`) on a StyleAR model whose frozen encoders stay outside DeepSpeed;
* :mod:`~stylear_core.training.losses`: the sigmoid DPO loss;
* :mod:`~stylear_core.training.batches`: collating token-shard and preference rows;
* :mod:`~stylear_core.training.deepspeed_config`, :mod:`~stylear_core.training.schedule`: engine
  config, warmup + cosine LR;
* :mod:`~stylear_core.training.checkpoint`, :mod:`~stylear_core.training.export`: checkpoint layout,
  the trained model (or final checkpoint) turned into an adapter (:mod:`stylear_core.adapters`);
* :mod:`~stylear_core.training.metrics`: per-step JSONL log and progress bar;
* :mod:`~stylear_core.training.preferences`: K samples per (prompt, style), CLIP-ranked pairs;
* :mod:`~stylear_core.training.synthetic_shards`: token shards of the procedural style set.
"""

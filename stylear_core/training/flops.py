"""FLOPs of one training step of the backbone, for model- and hardware-FLOPs utilisation (MFU / HFU).

Counts follow Chowdhery et al., "PaLM: Scaling Language Modeling with Pathways" (2022, appendix B),
with two corrections that matter here:

* ``N`` is the backbone's parameters that *compute*: decoder layers, final norm, LM head and LoRA
  factors. The input embedding table is a lookup and is left out (the LM head is a matmul and stays in).
* Weight gradients cost ``2·N_train`` per token, where ``N_train`` is the computing parameters that
  train: all of ``N`` when fine-tuning the whole backbone (``6N`` in all), only the LoRA factors with
  LoRA (``4N + 2·N_lora``, about ``4N``): the frozen base gets input gradients but no weight gradients.

Attention is counted causally over each row's real tokens: a token at position ``i`` attends to
``i + 1`` tokens, ``QK^T`` and ``AV`` cost ``4·d`` per attended token and layer, the backward pass
twice the forward. Padding is not model work, so neither count includes it; a path that computes
pads shows it as lower utilisation. The style encoder, resampler and VQ decoder are not counted.

Hardware FLOPs add what activation checkpointing recomputes: the forward pass of the checkpointed
decoder layers (their weights and attention), once more per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

MODEL_FLOPS_FORMULA = "(4N + 2N_train)·tokens + 6·L·d·Σ S(S+1)  [N_train = LoRA factors (≈4N) or N (6N)]"
HARDWARE_FLOPS_FORMULA = "model FLOPs + (k/L)·(2·N_layers·tokens + 2·L·d·Σ S(S+1))  [k checkpointed layers]"


@dataclass(frozen=True)
class BackboneFlopCounts:
    """Parameter counts and sizes that set a backbone's training FLOPs (see the module docstring)."""

    compute_params: int  # N: non-embedding parameters that compute
    trainable_params: int  # N_train: those of N that get weight gradients
    layer_params: int  # N_layers: those of N inside decoder layers (what recompute runs again)
    layers: int  # L
    hidden: int  # d


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one training step: ``model`` (the work the model needs) and ``hardware`` (+ recompute)."""

    model: float
    hardware: float
    tokens: int


def backbone_flop_counts(backbone: nn.Module) -> BackboneFlopCounts:
    """Count ``backbone``'s (a Lumina / Chameleon causal LM, LoRA-injected or not) computing parameters.

    The input embedding table is excluded unless it is tied to the LM head (then it computes there).
    """
    embedding = backbone.get_input_embeddings().weight
    head = backbone.get_output_embeddings().weight
    skip = set() if head is embedding else {id(embedding)}
    compute = [p for p in backbone.parameters() if id(p) not in skip]
    layer_ids = {id(p) for p in backbone.model.layers.parameters()}
    return BackboneFlopCounts(
        compute_params=sum(p.numel() for p in compute),
        trainable_params=sum(p.numel() for p in compute if p.requires_grad),
        layer_params=sum(p.numel() for p in compute if id(p) in layer_ids),
        layers=backbone.config.num_hidden_layers,
        hidden=backbone.config.hidden_size,
    )


def training_step_flops(
    counts: BackboneFlopCounts, row_lengths: Sequence[int], checkpointed_layers: int = 0
) -> StepFlops:
    """Model and hardware FLOPs of one forward + backward over rows of ``row_lengths`` real tokens.

    ``checkpointed_layers`` (``k``) of the ``L`` decoder layers run their forward again in the backward.
    """
    if not 0 <= checkpointed_layers <= counts.layers:
        raise ValueError(f"checkpointed_layers must be in [0, {counts.layers}], got {checkpointed_layers}")
    tokens = sum(row_lengths)
    attended = sum(s * (s + 1) // 2 for s in row_lengths)  # causal: position i attends to i + 1 tokens
    attention_forward = 4 * counts.layers * counts.hidden * attended
    linear = (4 * counts.compute_params + 2 * counts.trainable_params) * tokens
    model = linear + 3 * attention_forward
    recompute = checkpointed_layers / counts.layers * (2 * counts.layer_params * tokens + attention_forward)
    return StepFlops(model=float(model), hardware=float(model + recompute), tokens=tokens)

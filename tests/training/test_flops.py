"""Training FLOP counts: embedding excluded, LoRA at 4N + 2N_lora, full at 6N, causal attention, recompute."""

from __future__ import annotations

import pytest

from benchmarks.train import flop_counts
from stylear_core.models.backbone import tiny_backbone, tiny_vocab
from stylear_core.models.lora import add_lora, lora_parameters
from stylear_core.models.presets import ModelConfig
from stylear_core.training.flops import BackboneFlopCounts, backbone_flop_counts, training_step_flops


def test_step_flops_by_hand():
    counts = BackboneFlopCounts(compute_params=100, trainable_params=10, layer_params=80, layers=2, hidden=4)
    flops = training_step_flops(counts, [3, 1], checkpointed_layers=1)
    # tokens 4; causal attended pairs 3*4/2 + 1 = 7; attention forward 4*L*d*7 = 224.
    assert flops.tokens == 4
    assert flops.model == (4 * 100 + 2 * 10) * 4 + 3 * 224
    # One of two layers recomputes its forward: half of (2 * N_layers * tokens + attention forward).
    assert flops.hardware == flops.model + 0.5 * (2 * 80 * 4 + 224)
    assert training_step_flops(counts, [3, 1]).hardware == flops.model
    with pytest.raises(ValueError):
        training_step_flops(counts, [3], checkpointed_layers=3)


def test_full_fine_tuning_is_6n_and_lora_about_4n():
    full = BackboneFlopCounts(
        compute_params=1000, trainable_params=1000, layer_params=900, layers=1, hidden=1
    )
    lora = BackboneFlopCounts(compute_params=1000, trainable_params=5, layer_params=900, layers=1, hidden=1)
    attention = 3 * 4 * 1 * 1 * 1  # one token attends to itself
    assert training_step_flops(full, [1]).model == 6 * 1000 + attention
    assert training_step_flops(lora, [1]).model == 4 * 1000 + 2 * 5 + attention


def test_backbone_counts_exclude_the_embedding_and_count_the_lm_head_and_lora():
    vocab = tiny_vocab()
    backbone = tiny_backbone(vocab)
    total = sum(p.numel() for p in backbone.parameters())
    embedding = backbone.get_input_embeddings().weight.numel()
    head = backbone.get_output_embeddings().weight.numel()
    layers = sum(p.numel() for p in backbone.model.layers.parameters())
    backbone.requires_grad_(True)
    full = backbone_flop_counts(backbone)
    assert full.compute_params == full.trainable_params == total - embedding
    assert (
        full.layer_params == layers < full.compute_params - head
    )  # the head and final norm are outside layers
    add_lora(backbone, rank=4, alpha=4.0)
    lora = backbone_flop_counts(backbone)
    n_lora = sum(p.numel() for p in lora_parameters(backbone))
    assert lora.trainable_params == n_lora
    assert lora.compute_params == total - embedding + n_lora
    assert (lora.layers, lora.hidden) == (backbone.config.num_hidden_layers, backbone.config.hidden_size)


def test_benchmark_counts_on_meta_match_the_real_model():
    from stylear_core.models.presets import build_stylear_model

    cfg = ModelConfig(preset="tiny", image_size=64, num_style_tokens=4)
    assert flop_counts(cfg) == backbone_flop_counts(build_stylear_model(cfg).backbone)
    # The 7B LoRA counts cost no memory (meta device): ~6.5B computing params, embedding excluded.
    big = flop_counts(ModelConfig(preset="lumina7b"))
    assert 6.4e9 < big.compute_params < 6.9e9 and big.layers == 32 and big.hidden == 4096
    assert big.trainable_params < big.compute_params / 100

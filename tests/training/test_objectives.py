"""The SFT and DPO objectives in one process (no DeepSpeed): losses against direct computations on the
StyleAR model, gradients only where they belong, and the export -> reload -> probe round trip."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from stylear_core.adapters.io import load_adapter
from stylear_core.adapters.probe import verify_adapter, write_probe
from stylear_core.data.images import to_pil
from stylear_core.data.layout import ImageTokenLayout
from stylear_core.models.lora import DEFAULT_ADAPTER, lora_state_dict, set_lora_state_dict
from stylear_core.models.presets import build_stylear_model, build_vqgan
from stylear_core.testing.fixtures import numpy_batch as table_batch
from stylear_core.testing.fixtures import perturb_
from stylear_core.training.objectives import REFERENCE_ADAPTER, StyleDPOObjective, StyleSFTObjective

CPU = torch.device("cpu")


def numpy_batch(path, rows: int) -> dict[str, np.ndarray]:
    return table_batch(pq.read_table(path).slice(0, rows))


def test_sft_loss_uses_the_target_decoded_by_the_frozen_vqgan(model_cfg, token_shards):
    cfg = dataclasses.replace(model_cfg, noise_strength_train=0.0)
    objective = StyleSFTObjective(cfg, style_source="vq_decode")
    module = objective.setup(CPU, "fp32")
    batch = objective.collate_fn()(numpy_batch(token_shards, 2))
    result = objective.compute(module, batch)

    model = build_stylear_model(cfg)  # same seeds: same weights
    vq = build_vqgan(cfg, model.vocab)
    layout = ImageTokenLayout.for_resolution(cfg.image_size, cfg.image_size, model.vocab)
    pixels = model.style_encoder.preprocess(to_pil(vq.decode(layout.decode(batch["image_tokens"]))))
    direct = model(
        batch["prompt_ids"],
        batch["image_tokens"],
        style_pixels=pixels,
        prompt_mask=batch["prompt_mask"],
        image_mask=batch["image_mask"],
    )
    assert result.loss.item() == pytest.approx(direct.loss.item(), rel=1e-5)
    assert result.tokens == int(batch["prompt_mask"].sum() + batch["image_mask"].sum())

    result.loss.backward()
    trained = objective.model
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained.lora_parameters())
    assert trained.resampler.latents.grad is not None
    assert all(p.grad is None for n, p in trained.backbone.named_parameters() if ".lora_" not in n)
    assert all(p.grad is None for p in trained.style_encoder.parameters())
    assert all(p.grad is None for p in objective.vqgan.parameters())


def test_dpo_loss_matches_a_direct_computation_from_log_probs(model_cfg, sft_adapter, preference_pairs):
    beta = 0.5
    objective = StyleDPOObjective(model_cfg, str(sft_adapter), beta=beta, noise_strength=0.0)
    module = objective.setup(CPU, "fp32")
    policy_params = [p for n, p in module.backbone.named_parameters() if f".lora_B.{DEFAULT_ADAPTER}." in n]
    perturb_(policy_params, seed=7)  # the policy has moved away from the SFT reference
    batch = objective.collate_fn()(numpy_batch(preference_pairs, 3))
    result = objective.compute(module, batch)

    reference = load_adapter(build_stylear_model(model_cfg), sft_adapter)
    policy = load_adapter(build_stylear_model(model_cfg), sft_adapter)
    set_lora_state_dict(policy.backbone, lora_state_dict(module.backbone, DEFAULT_ADAPTER))
    with torch.no_grad():
        style = reference.style_tokens(style_pixels=batch["style_pixels"], noise_strength=0.0)

        def logps(model, tokens, mask):
            return model.log_probs(
                batch["prompt_ids"],
                tokens,
                style_tokens=style,
                prompt_mask=batch["prompt_mask"],
                image_mask=mask,
            )

        pc, pr = (
            logps(policy, batch["chosen_tokens"], batch["chosen_mask"]),
            logps(policy, batch["rejected_tokens"], batch["rejected_mask"]),
        )
        rc, rr = (
            logps(reference, batch["chosen_tokens"], batch["chosen_mask"]),
            logps(reference, batch["rejected_tokens"], batch["rejected_mask"]),
        )
    expected = -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()
    assert not torch.allclose(pc, rc)  # the test would prove nothing with policy == reference
    assert result.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    margin = (beta * ((pc - rc) - (pr - rr))).mean()
    assert result.metrics["reward_margin"] == pytest.approx(margin.item(), rel=1e-4, abs=1e-6)

    result.loss.backward()
    named = dict(module.backbone.named_parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy_params)
    assert all(p.grad is None for n, p in named.items() if f".{REFERENCE_ADAPTER}." in n)
    assert all(not p.requires_grad for n, p in named.items() if f".{REFERENCE_ADAPTER}." in n)
    assert all(p.grad is None for p in module.resampler.parameters())


def test_export_reloads_to_the_same_logits(tmp_path, model_cfg, token_shards):
    objective = StyleSFTObjective(model_cfg)
    module = objective.setup(CPU, "fp32")
    perturb_(objective.model.trainable_parameters(), seed=3)
    batch = objective.collate_fn()(numpy_batch(token_shards, 2))
    directory = tmp_path / "adapter"
    objective.export(str(directory), rank=0)
    write_probe(directory, *objective.probe(module, batch))

    untuned = objective.build_model()
    assert verify_adapter(untuned, directory) > 1e-3  # the check can fail: the base alone is different
    reloaded = load_adapter(objective.build_model(), directory)
    assert verify_adapter(reloaded, directory) < 1e-5
    assert sorted(p.name for p in directory.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "probe.safetensors",
        "resampler.safetensors",
    ]


def test_full_backbone_export_round_trip(tmp_path, model_cfg, token_shards):
    objective = StyleSFTObjective(dataclasses.replace(model_cfg, trainable="full"))
    module = objective.setup(CPU, "fp32")
    perturb_(objective.model.trainable_parameters(), seed=4)
    batch = objective.collate_fn()(numpy_batch(token_shards, 2))
    objective.export(str(tmp_path), rank=0)
    write_probe(tmp_path, *objective.probe(module, batch))
    assert (tmp_path / "backbone.safetensors").is_file() and not (
        tmp_path / "adapter_model.safetensors"
    ).exists()
    assert verify_adapter(load_adapter(objective.build_model(), tmp_path), tmp_path) < 1e-5


def test_export_without_style_tokens_round_trip(tmp_path, model_cfg, token_shards, vocab):
    objective = StyleSFTObjective(model_cfg, use_style_tokens=False)
    module = objective.setup(CPU, "fp32")
    perturb_(objective.model.lora_parameters(), seed=5)
    batch = objective.collate_fn()(numpy_batch(token_shards, 2))
    assert not (batch["prompt_ids"] == vocab.style_placeholder).any()
    objective.compute(module, batch).loss.backward()
    assert all(p.grad is None for p in objective.model.resampler.parameters())  # no style tokens, no signal
    objective.export(str(tmp_path), rank=0)
    write_probe(tmp_path, *objective.probe(module, batch))
    assert verify_adapter(load_adapter(objective.build_model(), tmp_path), tmp_path) < 1e-5

"""StyleARModel on tiny random parts: style placement, noise, gradient routing, image-only loss, presets."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from stylear_core.config import ConfigError, from_dict
from stylear_core.data.layout import ImageTokenLayout
from stylear_core.data.tokenizer import style_prompt_ids
from stylear_core.models.backbone import IGNORE_INDEX
from stylear_core.models.lora import adapter_config, lora_parameters
from stylear_core.models.presets import ModelConfig, build_prompt_tokenizer, build_stylear_model, build_vqgan
from stylear_core.models.stylear import StyleARModel, sequence_labels

N_STYLE = 4
SIZE = 64


def tiny_config(**overrides) -> ModelConfig:
    return from_dict(
        ModelConfig, {"preset": "tiny", "num_style_tokens": N_STYLE, "image_size": SIZE, **overrides}
    )


@pytest.fixture(scope="module")
def parts():
    cfg = tiny_config()
    model = build_stylear_model(cfg)
    tokenizer = build_prompt_tokenizer(cfg, model.vocab)
    vq = build_vqgan(cfg, model.vocab)
    return cfg, model, tokenizer, vq


def make_batch(model: StyleARModel, tokenizer, vq, prompts=("a red cat", "a house by the sea, at night")):
    """Left-padded prompt ids, image tokens of random images, CLIP-normalised style pixels."""
    gen = torch.Generator().manual_seed(11)
    rows = [style_prompt_ids(tokenizer, p, N_STYLE, SIZE, SIZE) for p in prompts]
    width = max(map(len, rows))
    prompt_ids = torch.tensor([[model.vocab.pad] * (width - len(r)) + r for r in rows])
    pixels = torch.rand(len(prompts), 3, SIZE, SIZE, generator=gen) * 2 - 1
    with torch.no_grad():
        codes = vq.encode(pixels)
    image_tokens = ImageTokenLayout.for_resolution(SIZE, SIZE, model.vocab).encode(codes)
    style_pixels = torch.randn(len(prompts), 3, SIZE, SIZE, generator=gen)
    return prompt_ids, image_tokens, style_pixels


def randomize_lora(model: StyleARModel) -> None:
    with torch.no_grad():
        for p in lora_parameters(model.backbone):
            p.copy_(torch.randn_like(p) * 0.1)


def test_style_tokens_replace_the_placeholders(parts):
    _, model, tokenizer, vq = parts
    prompt_ids, _, style_pixels = make_batch(model, tokenizer, vq)
    tokens = model.style_tokens(style_pixels, noise_strength=0.0)
    assert tokens.shape == (2, N_STYLE, model.backbone.config.hidden_size)
    embeds = model.prompt_embeddings(prompt_ids, tokens)
    plain = model.backbone.get_input_embeddings()(prompt_ids)
    placeholder = prompt_ids == model.vocab.style_placeholder
    for row in range(2):
        torch.testing.assert_close(embeds[row][placeholder[row]], tokens[row])
        torch.testing.assert_close(embeds[row][~placeholder[row]], plain[row][~placeholder[row]])


def test_noise_zero_is_deterministic_and_noise_is_not(parts):
    _, model, tokenizer, vq = parts
    prompt_ids, image_tokens, style_pixels = make_batch(model, tokenizer, vq)
    model.eval()
    with torch.no_grad():
        a = model(prompt_ids, image_tokens, style_pixels=style_pixels, noise_strength=0.0).loss
        b = model(prompt_ids, image_tokens, style_pixels=style_pixels, noise_strength=0.0).loss
        c = model(prompt_ids, image_tokens, style_pixels=style_pixels, noise_strength=0.5).loss
        d = model(prompt_ids, image_tokens, style_pixels=style_pixels, noise_strength=0.5).loss
    assert torch.equal(a, b)
    assert not torch.equal(c, d) and not torch.equal(a, c)
    assert model.default_noise_strength() == model.noise_strength_infer
    model.train()
    assert model.default_noise_strength() == model.noise_strength_train
    assert not model.style_encoder.visual.training  # the frozen tower never trains


def test_gradients_reach_resampler_and_lora_only(parts):
    _, model, tokenizer, vq = parts
    prompt_ids, image_tokens, style_pixels = make_batch(model, tokenizer, vq)
    randomize_lora(model)
    model.train()
    model.zero_grad(set_to_none=True)
    model(prompt_ids, image_tokens, style_pixels=style_pixels).loss.backward()
    for name, p in model.resampler.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    lora = lora_parameters(model.backbone)
    assert len(lora) == 2 * (2 * 5 + 1)
    for p in lora:
        assert p.grad is not None and p.grad.abs().sum() > 0
    for name, p in model.backbone.named_parameters():
        if ".lora_" not in name:
            assert not p.requires_grad and p.grad is None, name
    for name, p in model.style_encoder.named_parameters():
        assert not p.requires_grad and p.grad is None, name
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable == {id(p) for p in [*model.resampler.parameters(), *lora]}
    assert set(model.trainable_state_dict()) == {n for n, p in model.named_parameters() if id(p) in trainable}


def test_loss_is_on_image_tokens_only(parts):
    _, model, tokenizer, vq = parts
    prompt_ids, image_tokens, style_pixels = make_batch(model, tokenizer, vq)
    model.eval()
    out = model(prompt_ids, image_tokens, style_pixels=style_pixels, noise_strength=0.0, return_logits=True)
    logits = out.logits
    logits.retain_grad()
    out.loss.backward()
    prompt_len, image_len = prompt_ids.shape[1], image_tokens.shape[1]
    assert int(out.num_tokens) == image_tokens.numel()
    # Only positions predicting an image token (prompt_len - 1 .. end - 1) carry gradient.
    per_position = logits.grad.abs().sum(dim=(0, 2))
    assert (per_position[: prompt_len - 1] == 0).all()
    assert (per_position[prompt_len - 1 : -1] > 0).all()
    assert per_position[-1] == 0
    manual = torch.nn.functional.cross_entropy(
        logits[:, prompt_len - 1 : -1].reshape(-1, logits.shape[-1]).float(), image_tokens.reshape(-1)
    )
    torch.testing.assert_close(out.loss, manual)
    labels = sequence_labels(prompt_len, image_tokens)
    assert (labels[:, :prompt_len] == IGNORE_INDEX).all() and torch.equal(
        labels[:, prompt_len:], image_tokens
    )
    assert labels.shape == (2, prompt_len + image_len)


def test_log_probs_sum_image_tokens_and_ignore_left_padding(parts):
    _, model, tokenizer, vq = parts
    prompt_ids, image_tokens, style_pixels = make_batch(model, tokenizer, vq)
    randomize_lora(model)
    model.eval()
    with torch.no_grad():
        tokens = model.style_tokens(style_pixels, noise_strength=0.0)
        batch = model.log_probs(prompt_ids, image_tokens, style_tokens=tokens)
        out = model(prompt_ids, image_tokens, style_tokens=tokens)
        torch.testing.assert_close(batch.sum(), -out.ce * out.num_tokens)
        # Row 0 is left-padded in the batch; alone it has no padding and must score the same.
        pad = int((prompt_ids[0] == model.vocab.pad).sum())
        assert pad > 0
        alone = model.log_probs(prompt_ids[:1, pad:], image_tokens[:1], style_tokens=tokens[:1])
        torch.testing.assert_close(alone[0], batch[0], atol=1e-4, rtol=1e-5)
        with model.base_backbone():
            base = model.log_probs(prompt_ids, image_tokens, style_tokens=tokens)
        assert not torch.allclose(base, batch)
        # Padded image positions are not scored.
        mask = torch.ones_like(image_tokens, dtype=torch.bool)
        mask[1, -5:] = False
        masked = model.log_probs(prompt_ids, image_tokens, style_tokens=tokens, image_mask=mask)
        torch.testing.assert_close(masked[0], batch[0])
        assert masked[1] > batch[1]


def test_full_training_and_gradient_checkpointing_presets():
    cfg = tiny_config(trainable="full", gradient_checkpointing=True)
    model = build_stylear_model(cfg)
    assert not lora_parameters(model.backbone)
    assert all(p.requires_grad for p in model.backbone.parameters())
    assert all(layer.gradient_checkpointing for layer in model.backbone.model.layers)
    assert not any(p.requires_grad for p in model.style_encoder.parameters())
    reference = build_stylear_model(tiny_config(trainable="full"))
    tokenizer = build_prompt_tokenizer(cfg, model.vocab)
    prompt_ids, image_tokens, style_pixels = make_batch(model, tokenizer, build_vqgan(cfg, model.vocab))
    losses = []
    for m in (model, reference):
        m.train()
        loss = m(prompt_ids, image_tokens, style_pixels=style_pixels, noise_strength=0.0).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1])  # same seed -> same weights
    for (name, p), q in zip(model.backbone.named_parameters(), reference.backbone.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_release_dir_builds_through_the_preset(tmp_path):
    probe = build_stylear_model(tiny_config(trainable="full"))
    release = {}
    gen = torch.Generator().manual_seed(2)
    for name, module in probe.backbone.named_modules():
        if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")):
            key = f"{name}_lora"
        elif name == "lm_head":
            key = "lm_head.lm_head_lora"
        else:
            continue
        release[f"{key}.A"] = torch.randn(module.in_features, 2, generator=gen)
        release[f"{key}.B"] = torch.randn(2, module.out_features, generator=gen)
    save_file(release, str(tmp_path / "model.safetensors"))
    torch.save({k: v + 1.0 for k, v in probe.resampler.state_dict().items()}, tmp_path / "image_proj.pth")

    model = build_stylear_model(tiny_config(stylear_release=str(tmp_path)))
    assert adapter_config(model.backbone).r == 2 and adapter_config(model.backbone).lora_alpha == 2
    torch.testing.assert_close(model.resampler.latents, probe.resampler.latents + 1.0)
    lm_head_a = model.backbone.lm_head.lora_A["default"].weight
    torch.testing.assert_close(lm_head_a, release["lm_head.lm_head_lora.A"].t())


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"num_style_tokens": 0}, "num_style_tokens"),
        ({"image_size": 70}, "image_size"),
        ({"preset": "huge"}, "preset"),
        ({"trainable": "full", "stylear_release": "/x"}, "stylear_release"),
    ],
)
def test_bad_model_config_names_the_field(overrides, match):
    with pytest.raises(ConfigError, match=match):
        tiny_config(**overrides)

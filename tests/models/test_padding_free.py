"""Padding-free batches: the same loss, log-probs and gradients as the masked layout, with no dense mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stylear_core.config import ConfigError, from_dict
from stylear_core.models.lora import lora_parameters
from stylear_core.models.presets import ModelConfig, build_stylear_model
from stylear_core.models.stylear import StyleARModel, padding_free_order

N_STYLE = 4
SIZE = 64


def tiny_config(**overrides) -> ModelConfig:
    return from_dict(
        ModelConfig, {"preset": "tiny", "num_style_tokens": N_STYLE, "image_size": SIZE, **overrides}
    )


@pytest.fixture(scope="module")
def model() -> StyleARModel:
    model = build_stylear_model(tiny_config())
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        for p in lora_parameters(model.backbone):  # LoRA B starts at zero: make the adapters count
            p.copy_(torch.randn_like(p) * 0.1)
    return model.eval()


def mixed_batch(model: StyleARModel) -> dict[str, torch.Tensor]:
    """Three rows with different prompt lengths (left-padded) and image lengths (right-padded)."""
    gen = torch.Generator().manual_seed(3)
    vocab = model.vocab
    prompt_lens, image_lens = (9, 14, 6), (40, 23, 31)
    width, length = max(prompt_lens), max(image_lens)
    prompt_ids = torch.full((3, width), vocab.pad)
    image_tokens = torch.full((3, length), vocab.pad)
    for row, (p, t) in enumerate(zip(prompt_lens, image_lens)):
        ids = torch.randint(2, 200, (p,), generator=gen)
        ids[(ids == vocab.style_placeholder) | (ids == vocab.pad)] = 2
        ids[1 : 1 + N_STYLE] = vocab.style_placeholder
        ids[0] = vocab.bos
        prompt_ids[row, width - p :] = ids
        codes = torch.randint(0, vocab.codebook_size, (t,), generator=gen)
        image_tokens[row, :t] = vocab.code_to_id[codes]
    hidden = model.backbone.config.hidden_size
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_ids != vocab.pad,
        "image_tokens": image_tokens,
        "image_mask": torch.arange(length) < torch.tensor(image_lens)[:, None],
        "style_tokens": torch.randn(3, N_STYLE, hidden, generator=gen),
    }


class SdpaCalls:
    """Wraps ``F.scaled_dot_product_attention`` to record, per call, whether a mask and is_causal were given."""

    def __init__(self):
        self.calls: list[tuple[bool, bool]] = []
        self._original = F.scaled_dot_product_attention

    def __enter__(self) -> SdpaCalls:
        def wrapped(*args, **kwargs):
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            self.calls.append((mask is not None, bool(kwargs.get("is_causal", False))))
            return self._original(*args, **kwargs)

        torch.nn.functional.scaled_dot_product_attention = wrapped
        return self

    def __exit__(self, *exc) -> None:
        torch.nn.functional.scaled_dot_product_attention = self._original


def test_padding_free_order_puts_real_tokens_first_in_order():
    mask = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 1, 1, 1], [0, 0, 1, 0, 0]], dtype=torch.bool)
    order = padding_free_order(mask)
    assert order.tolist() == [[1, 2, 4, 0, 3], [0, 1, 2, 3, 4], [2, 0, 1, 3, 4]]


def test_mixed_length_loss_log_probs_and_gradients_equal_the_masked_path(model):
    batch = mixed_batch(model)
    image_tokens = batch["image_tokens"]
    results = {}
    for padding_free in (False, True):
        model.padding_free = padding_free
        model.zero_grad(set_to_none=True)
        tokens = batch["style_tokens"].clone().requires_grad_(True)
        kwargs = {k: v for k, v in batch.items() if k != "style_tokens"}
        out = model(style_tokens=tokens, **kwargs)
        out.loss.backward()
        grads = [p.grad.clone() for p in lora_parameters(model.backbone)]
        with torch.no_grad():
            log_probs = model.log_probs(style_tokens=tokens, **kwargs)
            logits = model.sequence_logits(style_tokens=tokens, **{k: kwargs[k] for k in kwargs})
        results[padding_free] = (out, log_probs, grads, tokens.grad.clone(), logits)
    model.padding_free = True
    masked, free = results[False], results[True]
    assert int(free[0].num_tokens) == int(batch["image_mask"].sum()) == int(masked[0].num_tokens)
    torch.testing.assert_close(free[0].loss, masked[0].loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(free[1], masked[1], atol=1e-4, rtol=1e-5)
    # The rows differ (so equal per-row scores are not one number repeated).
    assert len({round(float(v), 3) for v in free[1]}) == 3
    for a, b in zip(free[2], masked[2], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in free[2])
    torch.testing.assert_close(free[3], masked[3], atol=1e-5, rtol=1e-4)
    # sequence_logits gives the padded layout back: equal at every real position.
    real = torch.cat([batch["prompt_mask"], batch["image_mask"]], dim=1)
    torch.testing.assert_close(free[4][real], masked[4][real], atol=1e-4, rtol=1e-4)
    assert free[4].shape == masked[4].shape == (3, real.shape[1], model.backbone.config.vocab_size)
    assert image_tokens.shape[1] + batch["prompt_ids"].shape[1] == real.shape[1]


def test_padding_free_path_builds_no_dense_mask_and_the_masked_path_does(model):
    batch = mixed_batch(model)
    layers = model.backbone.config.num_hidden_layers
    with torch.no_grad():
        model.padding_free = True
        with SdpaCalls() as free:
            model(**batch)
            model.log_probs(**batch)
        model.padding_free = False
        with SdpaCalls() as masked:
            model(**batch)
        model.padding_free = True
    assert free.calls == [(False, True)] * (2 * layers)
    assert len(masked.calls) == layers and all(has_mask and not causal for has_mask, causal in masked.calls)


def test_model_config_padding_free_knob_reaches_the_model():
    assert build_stylear_model(tiny_config()).padding_free
    assert not build_stylear_model(tiny_config(padding_free=False)).padding_free


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        (True, list(range(8))),
        (False, []),
        (1.0, list(range(8))),
        (0.5, [0, 2, 4, 6]),
        (0.25, [0, 4]),
        (0.01, [0]),
        (0.0, []),
    ],
)
def test_checkpointed_layers_fraction(setting, expected):
    assert tiny_config(gradient_checkpointing=setting).checkpointed_layers(8) == expected


def test_partial_gradient_checkpointing_flags_layers_and_keeps_gradients():
    full = build_stylear_model(tiny_config(gradient_checkpointing=True))
    layers = len(full.backbone.model.layers)
    assert layers >= 2
    half = build_stylear_model(tiny_config(gradient_checkpointing=0.5))
    flags = [layer.gradient_checkpointing for layer in half.backbone.model.layers]
    assert flags == [i % 2 == 0 for i in range(layers)]
    assert all(layer.gradient_checkpointing for layer in full.backbone.model.layers)
    none = build_stylear_model(tiny_config())
    assert not any(layer.gradient_checkpointing for layer in none.backbone.model.layers)
    # Same weights (same seed), same loss and gradients whichever layers recompute.
    batch = mixed_batch(none)
    grads, calls = [], []
    for model in (none, half):
        model.train()
        counts = [0] * layers
        # On a submodule: transformers checkpoints the layer's forward, so the layer's own hooks run once.
        hooks = [
            layer.mlp.register_forward_pre_hook(lambda *_, i=i, c=counts: c.__setitem__(i, c[i] + 1))
            for i, layer in enumerate(model.backbone.model.layers)
        ]
        model(noise_strength=0.0, **batch).loss.backward()
        for hook in hooks:
            hook.remove()
        grads.append([p.grad for p in model.trainable_parameters()])
        calls.append(counts)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
    # The backward pass ran the forward of the checkpointed layers again, and only theirs.
    assert calls[0] == [1] * layers
    assert calls[1] == [2 if i % 2 == 0 else 1 for i in range(layers)]
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        tiny_config(gradient_checkpointing=1.5).validate()
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        tiny_config(gradient_checkpointing="half")

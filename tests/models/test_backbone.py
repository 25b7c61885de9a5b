"""The Lumina backbone: real 7B sizes on meta, unmasked image logits, caches, checkpointing, the loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import DynamicCache

from stylear_core.data.layout import ImageTokenLayout, TokenVocab
from stylear_core.models.backbone import (
    LuminaChameleonForCausalLM,
    count_parameters,
    lumina_mgpt_7b_768,
    next_token_loss,
    tiny_backbone,
    tiny_vocab,
    vocab_from_vocabulary_map,
)
from stylear_core.models.backbone_checkpoint import CheckpointError, load_lumina_backbone


@pytest.fixture
def vocab() -> TokenVocab:
    return tiny_vocab()


@pytest.fixture
def backbone(vocab) -> LuminaChameleonForCausalLM:
    torch.manual_seed(0)
    return tiny_backbone(vocab).eval()


def image_sequence(vocab: TokenVocab, batch: int = 2, side: int = 4) -> torch.Tensor:
    layout = ImageTokenLayout(side, side, vocab)
    codes = torch.randint(0, vocab.codebook_size, (batch, side, side))
    return layout.encode(codes)


def test_lumina_7b_preset_on_meta_has_the_real_sizes():
    with torch.device("meta"):
        model = lumina_mgpt_7b_768()
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (32, 4096, 65536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (32, 32, 11008)
    assert cfg.rope_parameters["rope_theta"] == 10000.0
    assert (cfg.z_loss_weight, cfg.dropout, cfg.mask_image_logits) == (0.0, 0.0, False)
    assert 6.5e9 <= count_parameters(model) <= 7.2e9
    assert all(p.is_meta for p in model.parameters())
    keys = set(model.state_dict())
    assert not any("vqmodel" in k for k in keys), "the backbone must not carry VQ weights"
    assert {"model.embed_tokens.weight", "model.layers.31.mlp.down_proj.weight", "lm_head.weight"} <= keys
    assert model.model.layers[0].self_attn.q_norm.weight.shape == (32, 128)


def test_tiny_vocab_keeps_the_special_structure(vocab):
    specials = [vocab.bos, vocab.pad, vocab.eos, vocab.image_start, vocab.image_end, vocab.new_line]
    specials += [vocab.image_placeholder, vocab.style_placeholder]
    specials += [vocab.grid_base + g for g in range(vocab.max_grids + 1)]
    assert len(set(specials)) == len(specials)
    assert not set(specials) & set(vocab.image_code_ids)
    assert vocab.codebook_size == 256 and vocab.vocab_size <= 2048
    # The config's vocabulary map reads back to the same vocab.
    model_vocab_map = tiny_backbone(vocab).config.vocabulary_map
    assert vocab_from_vocabulary_map(model_vocab_map, vocab.vocab_size) == vocab


def test_image_token_logits_are_not_masked(backbone, vocab):
    ids = image_sequence(vocab)
    logits = backbone(input_ids=ids).logits
    image_ids = torch.tensor(vocab.image_code_ids)
    image_logits = logits[..., image_ids]
    assert torch.isfinite(image_logits).all()
    assert (image_logits > torch.finfo(logits.dtype).min / 2).all()

    backbone.config.mask_image_logits = True  # Lumina's switch: text-only decoding
    masked = backbone(input_ids=ids).logits
    assert (masked[..., image_ids] == torch.finfo(masked.dtype).min).all()
    text_ids = torch.ones(vocab.vocab_size, dtype=torch.bool)
    text_ids[image_ids] = False
    torch.testing.assert_close(masked[..., text_ids], logits[..., text_ids])


def test_inputs_embeds_match_input_ids(backbone, vocab):
    ids = image_sequence(vocab)
    by_ids = backbone(input_ids=ids).logits
    by_embeds = backbone(inputs_embeds=backbone.get_input_embeddings()(ids)).logits
    torch.testing.assert_close(by_embeds, by_ids)


def test_cached_decoding_matches_a_full_forward(backbone, vocab):
    ids = image_sequence(vocab, batch=2)
    full = backbone(input_ids=ids).logits
    cache = DynamicCache(config=backbone.config)
    prefill = 7
    out = backbone(input_ids=ids[:, :prefill], past_key_values=cache, use_cache=True)
    steps = [out.logits]
    for t in range(prefill, ids.shape[1]):
        out = backbone(
            input_ids=ids[:, t : t + 1],
            past_key_values=out.past_key_values,
            use_cache=True,
            cache_position=torch.tensor([t]),
        )
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)
    # logits_to_keep=1 gives only the last position's logits.
    assert backbone(input_ids=ids, logits_to_keep=1).logits.shape == (2, 1, vocab.vocab_size)


def test_gradient_checkpointing_gives_the_same_gradients(vocab):
    torch.manual_seed(0)
    model = tiny_backbone(vocab).train()
    ids = image_sequence(vocab)

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    checkpointed = grads()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, msg=name)


def test_residual_dropout_acts_in_training_only(vocab):
    torch.manual_seed(0)
    model = tiny_backbone(vocab, dropout=0.5)
    ids = image_sequence(vocab)
    model.train()
    assert not torch.allclose(model(input_ids=ids).logits, model(input_ids=ids).logits)
    model.eval()
    torch.testing.assert_close(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_next_token_loss_ignores_unlabelled_positions_and_adds_z_loss():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.randint(0, 11, (2, 6))
    labels[:, :3] = -100
    base = next_token_loss(logits, labels)
    manual = torch.nn.functional.cross_entropy(logits[:, 2:5].reshape(-1, 11), labels[:, 3:].reshape(-1))
    torch.testing.assert_close(base.ce, manual)
    assert int(base.num_tokens) == 6
    changed = logits.clone()
    changed[:, :2] += 100.0  # positions whose next token is unlabelled
    torch.testing.assert_close(next_token_loss(changed, labels).ce, base.ce)
    with_z = next_token_loss(logits, labels, z_loss_weight=0.1)
    lse = torch.logsumexp(logits[:, 2:5], dim=-1)
    torch.testing.assert_close(with_z.z_loss, lse.pow(2).mean())
    torch.testing.assert_close(with_z.total, base.ce + 0.1 * with_z.z_loss)


def write_lumina_checkpoint(model: LuminaChameleonForCausalLM, path: Path, extra: dict | None = None) -> dict:
    """``model`` as a Lumina-mGPT HF dir: legacy config.json, Lumina's per-shard qk-norm shape, VQ
    encoder tensors, two safetensors shards + index. Returns the state dict written."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_dict()
    cfg.pop("rope_parameters")
    cfg.update(
        architectures=["ChameleonXLLMXForConditionalGeneration"],
        rope_theta=10000.0,
        rope_scaling=None,
        z_loss_weight=1e-5,
        dropout=0.05,
        mask_image_logits=False,
        torch_dtype="float32",
    )
    (path / "config.json").write_text(json.dumps(cfg))
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    for key in list(state):
        if key.endswith(("q_norm.weight", "q_norm.bias", "k_norm.weight", "k_norm.bias")):
            state[key] = state[key][:1].clone()  # Lumina stores (model_parallel_size=1, head_dim)
    state["model.vqmodel.quantize.embedding.weight"] = torch.randn(8, 4)
    state["model.vqmodel.encoder.conv_in.weight"] = torch.randn(4, 3, 3, 3)
    state.update(extra or {})
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2]}
    shards["model-00002-of-00002.safetensors"] = keys[len(keys) // 2 :]
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, str(path / name))
    index = {"metadata": {}, "weight_map": {k: name for name, names in shards.items() for k in names}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return state


def test_lumina_checkpoint_dir_loads(tmp_path, vocab):
    torch.manual_seed(1)
    source = tiny_backbone(vocab).eval()
    with torch.no_grad():  # Lumina's qk-norm params are shared by all heads of a shard
        for layer in source.model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                norm.weight.copy_(torch.randn(1, norm.weight.shape[1]).expand_as(norm.weight))
                norm.bias.copy_(torch.randn(1, norm.bias.shape[1]).expand_as(norm.bias))
    write_lumina_checkpoint(source, tmp_path / "lumina")

    loaded = load_lumina_backbone(tmp_path / "lumina")
    assert loaded.config.z_loss_weight == 1e-5 and loaded.config.dropout == 0.05
    assert not loaded.config.mask_image_logits and not loaded.training
    assert not hasattr(loaded.model, "vqmodel")
    ids = image_sequence(vocab)
    torch.testing.assert_close(loaded(input_ids=ids).logits, source(input_ids=ids).logits)
    assert vocab_from_vocabulary_map(loaded.config.vocabulary_map, loaded.config.vocab_size) == vocab

    half = load_lumina_backbone(tmp_path / "lumina", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


def test_save_pretrained_round_trip(tmp_path, backbone, vocab):
    backbone.save_pretrained(tmp_path / "hf")
    loaded = load_lumina_backbone(tmp_path / "hf")
    ids = image_sequence(vocab)
    torch.testing.assert_close(loaded(input_ids=ids).logits, backbone(input_ids=ids).logits)


@pytest.mark.parametrize(
    ("extra", "drop", "match"),
    [
        (
            {"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)},
            None,
            r"model\.layers\.0\.self_attn\.q_proj\.bias",
        ),
        (
            {"model.layers.7.mlp.up_proj.weight": torch.zeros(172, 64)},
            None,
            r"model\.layers\.7\.mlp\.up_proj\.weight",
        ),
        ({"lm_head.weight": torch.zeros(10, 64)}, None, r"lm_head\.weight: checkpoint shape \(10, 64\)"),
        ({}, "model.norm.weight", r"missing key 'model\.norm\.weight'"),
    ],
)
def test_a_checkpoint_with_a_wrong_key_is_rejected(tmp_path, backbone, extra, drop, match):
    state = write_lumina_checkpoint(backbone, tmp_path / "bad", extra)
    if drop is not None:
        del state[drop]
        save_file({k: v for k, v in state.items()}, str(tmp_path / "bad" / "model.safetensors"))
        (tmp_path / "bad" / "model.safetensors.index.json").unlink()
        for shard in (tmp_path / "bad").glob("model-*.safetensors"):
            shard.unlink()
    with pytest.raises(CheckpointError, match=match):
        load_lumina_backbone(tmp_path / "bad")


def test_loader_refuses_a_dir_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_lumina_backbone(tmp_path)

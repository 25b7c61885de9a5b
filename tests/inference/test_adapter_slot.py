"""Serving adapters through one LoRA slot: same outputs as peft loading the adapter, exact base restore."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from stylear_core.adapters.format import AdapterError, AdapterNotFoundError, base_model_id
from stylear_core.adapters.io import (
    adapter_path,
    list_adapters,
    load_adapter,
    read_adapter_dir,
    write_adapter_dir,
)
from stylear_core.inference.adapters import AdapterSlot
from stylear_core.inference.engine import GenerationRequest, ImageGenerationEngine
from stylear_core.inference.reference import reference_generate
from stylear_core.models.backbone import tiny_backbone, tiny_vocab
from stylear_core.models.lora import RELEASE_LORA_NAME, load_lora, load_stylear_release
from stylear_core.models.presets import ModelConfig, build_backbone, build_resampler, build_stylear_model
from stylear_core.models.resampler import load_image_proj, tiny_resampler
from stylear_core.testing.fixtures import lora_copy
from stylear_core.training.export import export_adapter, finalize_export

VOCAB = tiny_vocab()


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return tiny_backbone(VOCAB).eval()


def trained_lora(base, rank: int, alpha: float, seed: int):
    """A copy of ``base`` with one peft LoRA of random (as if trained) factors."""
    return lora_copy(base, rank, alpha, seed)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(300, 1024, (2, 12), generator=torch.Generator().manual_seed(1))


def test_slot_gives_what_peft_gives_with_the_adapter_loaded(base, tmp_path):
    tuned = trained_lora(base, rank=4, alpha=8.0, seed=1)
    write_adapter_dir(tmp_path / "a", tuned, kind="style")
    peft_loaded = load_lora(copy.deepcopy(base), tmp_path / "a")
    served = copy.deepcopy(base)
    slot = AdapterSlot(served, rank=8)
    assert torch.equal(logits(served, IDS), logits(base, IDS))  # an empty slot is the base model, bit for bit
    slot.activate(read_adapter_dir(tmp_path / "a"))
    assert slot.active == "a"
    want = logits(peft_loaded, IDS)
    assert not torch.allclose(want, logits(base, IDS), atol=1e-3)  # the adapter does change the output
    torch.testing.assert_close(logits(served, IDS), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(want, logits(tuned, IDS), atol=1e-5, rtol=1e-5)


def test_switching_adapters_is_exact_and_clearing_restores_the_base(base, tmp_path):
    write_adapter_dir(tmp_path / "one", trained_lora(base, 4, 4.0, seed=2), kind="style")
    write_adapter_dir(tmp_path / "two", trained_lora(base, 2, 4.0, seed=3), kind="subject")
    served = copy.deepcopy(base)
    slot = AdapterSlot(served, rank=4)
    one, two = read_adapter_dir(tmp_path / "one"), read_adapter_dir(tmp_path / "two")
    slot.activate(one)
    first = logits(served, IDS)
    slot.activate(two)
    second = logits(served, IDS)
    slot.activate(one)
    assert torch.equal(logits(served, IDS), first)
    assert not torch.allclose(first, second, atol=1e-3)
    slot.activate(None)
    assert slot.active is None
    assert torch.equal(logits(served, IDS), logits(base, IDS))
    # No base weight was touched by any of it.
    served_base = {n.replace(".base_layer", ""): p for n, p in served.named_parameters() if ".lora_" not in n}
    for name, param in base.named_parameters():
        assert torch.equal(param, served_base[name]), name


def test_stylear_release_layout_is_served_like_load_stylear_release(base, tmp_path):
    tuned = trained_lora(base, rank=4, alpha=4.0, seed=5)
    release = {}
    for name, param in tuned.named_parameters():
        if ".lora_A." in name:
            module = name.split(".lora_A.")[0]
            key = "lm_head.lm_head_lora" if module == "lm_head" else f"{module}_lora"
            release[f"{key}.A"] = param.detach().t().contiguous()  # release A is (in, r)
            b = dict(tuned.named_parameters())[name.replace("lora_A", "lora_B")]
            release[f"{key}.B"] = b.detach().t().contiguous()  # release B is (r, out)
    (tmp_path / "rel").mkdir()
    save_file(release, str(tmp_path / "rel" / RELEASE_LORA_NAME))
    expected = load_stylear_release(tmp_path / "rel", copy.deepcopy(base))
    served = copy.deepcopy(base)
    AdapterSlot(served, rank=4).activate(read_adapter_dir(tmp_path / "rel"))
    torch.testing.assert_close(logits(served, IDS), logits(expected, IDS), atol=1e-5, rtol=1e-5)


def test_a_training_export_is_served_like_training_loads_it(tmp_path):
    cfg = ModelConfig(preset="tiny", num_style_tokens=4, lora_rank=4, lora_alpha=8.0)
    trained = build_stylear_model(cfg)
    gen = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for param in trained.trainable_parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.2)
    export_adapter(trained, tmp_path / "ckpt" / "adapter")
    exported = finalize_export(
        tmp_path / "ckpt", tmp_path / "out", kind="style", base_model=base_model_id(cfg)
    )
    expected = load_adapter(build_stylear_model(cfg), exported)
    weights = read_adapter_dir(exported, "trained")
    assert weights.manifest["kind"] == "style" and weights.resampler_state is not None
    served, _ = build_backbone(cfg)
    AdapterSlot(served, rank=8).activate(weights)
    torch.testing.assert_close(logits(served, IDS), logits(expected.backbone, IDS), atol=1e-5, rtol=1e-5)
    resampler = build_resampler(cfg, expected.style_encoder.width, 64)
    load_image_proj(weights.resampler_state, resampler)
    for a, b in zip(resampler.state_dict().values(), expected.resampler.state_dict().values()):
        assert torch.equal(a, b)


def test_engine_with_an_active_adapter_matches_the_reference(base, tmp_path):
    write_adapter_dir(tmp_path / "s", trained_lora(base, 4, 4.0, seed=7), kind="style")
    served = copy.deepcopy(base)
    slot = AdapterSlot(served, rank=4)
    engine = ImageGenerationEngine(served, VOCAB)
    request = GenerationRequest([VOCAB.bos, 400, 401, 402], 64, 64, top_k=1, seed=0)
    (plain,) = engine.generate([request])
    slot.activate(read_adapter_dir(tmp_path / "s"))
    (adapted,) = engine.generate([request])
    assert torch.equal(adapted.tokens, reference_generate(served, VOCAB, request))
    assert not torch.equal(adapted.tokens, plain.tokens)


def test_adapter_dirs_are_listed_and_read_with_their_resampler(base, tmp_path):
    resampler = tiny_resampler(64, 64, num_queries=4)
    subjects = [{"identifier": "sks", "class_noun": "dog"}]
    write_adapter_dir(tmp_path / "dog", trained_lora(base, 4, 4.0, 8), kind="subject", subjects=subjects)
    write_adapter_dir(tmp_path / "ink", trained_lora(base, 4, 4.0, 9), kind="style", resampler=resampler)
    (tmp_path / "not-an-adapter").mkdir()
    listed = list_adapters(tmp_path)
    assert [a["name"] for a in listed] == ["dog", "ink"]
    assert listed[0]["kind"] == "subject" and listed[0]["subjects"] == subjects
    ink = read_adapter_dir(adapter_path(tmp_path, "ink"))
    assert ink.manifest["kind"] == "style"
    assert ink.resampler_state is not None
    assert torch.equal(ink.resampler_state["latents"], resampler.state_dict()["latents"])
    assert read_adapter_dir(tmp_path / "dog").resampler_state is None


def test_unusable_adapters_are_refused(base, tmp_path):
    write_adapter_dir(tmp_path / "big", trained_lora(base, 8, 8.0, 10), kind="style")
    slot = AdapterSlot(copy.deepcopy(base), rank=4)
    with pytest.raises(AdapterError, match="rank 8"):
        slot.activate(read_adapter_dir(tmp_path / "big"))
    foreign = read_adapter_dir(tmp_path / "big")
    foreign.rank = 4
    foreign.lora = {"model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 64)}
    with pytest.raises(AdapterError, match="not a LoRA target"):
        slot.activate(foreign)
    with pytest.raises(AdapterNotFoundError):
        adapter_path(tmp_path, "missing")
    for bad in ("../big", "a/b", "", ".hidden"):
        with pytest.raises(AdapterError):
            adapter_path(tmp_path, bad)
    write_adapter_dir(tmp_path / "full", trained_lora(base, 4, 4.0, 11), kind="style")
    (tmp_path / "full" / "backbone.safetensors").write_bytes(b"")
    with pytest.raises(AdapterError, match="fully fine-tuned"):
        read_adapter_dir(tmp_path / "full")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(AdapterError, match="unreadable"):
        read_adapter_dir(tmp_path / "broken")

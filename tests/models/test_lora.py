"""LoRA through peft on StyleAR's targets; peft-format save/load; StyleAR's released LoRA + image_proj."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import Linear as LoraLinear
from safetensors.torch import save_file

from stylear_core.data.layout import ImageTokenLayout
from stylear_core.models.backbone import tiny_backbone, tiny_vocab
from stylear_core.models.lora import (
    LoraLoadError,
    adapter_config,
    adapters_disabled,
    add_lora,
    convert_release_lora,
    load_lora,
    load_stylear_release,
    lora_parameters,
    read_release_lora,
    save_lora,
)
from stylear_core.models.resampler import tiny_resampler

VOCAB = tiny_vocab()
RANK = 4


@pytest.fixture
def base():
    torch.manual_seed(0)
    return tiny_backbone(VOCAB).eval()


@pytest.fixture
def ids():
    codes = torch.randint(0, VOCAB.codebook_size, (2, 4, 4), generator=torch.Generator().manual_seed(3))
    return ImageTokenLayout(4, 4, VOCAB).encode(codes)


def randomize_lora(model) -> None:
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn_like(p) * 0.2)


def test_lora_targets_stylears_modules_and_freezes_the_base(base, ids):
    before = base(input_ids=ids).logits
    add_lora(base, rank=RANK, alpha=8.0)
    wrapped = sorted(n for n, m in base.named_modules() if isinstance(m, LoraLinear))
    expected = sorted(
        [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"]
        + [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
        + ["lm_head"]
    )
    assert wrapped == expected
    trainable = [n for n, p in base.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert base.lm_head.scaling["default"] == 2.0
    torch.testing.assert_close(base(input_ids=ids).logits, before)  # B starts at zero


def test_save_load_round_trip_gives_identical_logits(tmp_path, base, ids):
    reference = copy.deepcopy(base)
    add_lora(base, rank=RANK, alpha=4.0, dropout=0.05)
    randomize_lora(base)
    want = base(input_ids=ids).logits
    assert not torch.allclose(want, reference(input_ids=ids).logits)
    save_lora(base, tmp_path / "adapter")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {
        "adapter_model.safetensors",
        "adapter_config.json",
    }

    fresh = copy.deepcopy(reference)
    load_lora(fresh, tmp_path / "adapter")
    assert adapter_config(fresh).r == RANK and adapter_config(fresh).lora_dropout == 0.05
    torch.testing.assert_close(fresh.eval()(input_ids=ids).logits, want)

    # The dir is a standard peft adapter.
    peft_model = PeftModel.from_pretrained(copy.deepcopy(reference), str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(peft_model(input_ids=ids).logits, want)

    with adapters_disabled(fresh):
        torch.testing.assert_close(fresh(input_ids=ids).logits, reference(input_ids=ids).logits)
    torch.testing.assert_close(fresh(input_ids=ids).logits, want)


def release_state_dict(model, rank: int = RANK) -> dict[str, torch.Tensor]:
    """Random factors in StyleAR's release layout: ``<m>_lora.A (in, r)``, ``<m>_lora.B (r, out)``."""
    gen = torch.Generator().manual_seed(7)
    state = {}
    modules = {
        f"model.layers.{i}.self_attn.{p}_proj": f"model.layers.{i}.self_attn.{p}_proj_lora"
        for i in range(2)
        for p in "qkvo"
    }
    modules.update(
        {f"model.layers.{i}.mlp.down_proj": f"model.layers.{i}.mlp.down_proj_lora" for i in range(2)}
    )
    modules["lm_head"] = "lm_head.lm_head_lora"
    for module_name, release_name in modules.items():
        linear = model.get_submodule(module_name)
        state[f"{release_name}.A"] = torch.randn(linear.in_features, rank, generator=gen) * 0.3
        state[f"{release_name}.B"] = torch.randn(rank, linear.out_features, generator=gen) * 0.3
    return state


def test_release_lora_matches_x_at_a_at_b(tmp_path, base, ids):
    release = release_state_dict(base)
    resampler = tiny_resampler(embedding_dim=32, output_dim=64, num_queries=4)
    (tmp_path / "release").mkdir()
    save_file(release, str(tmp_path / "release" / "model.safetensors"))
    torch.save(resampler.state_dict(), tmp_path / "release" / "image_proj.pth")

    # By hand: every adapted linear computes W x + x @ A @ B, i.e. its weight becomes W + (A @ B)^T.
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for key in release:
            if key.endswith(".A"):
                module = key.removesuffix(".A").replace(".lm_head_lora", "").removesuffix("_lora")
                delta = release[key] @ release[key.removesuffix(".A") + ".B"]
                merged.get_submodule(module).weight += delta.t()

    target = tiny_resampler(embedding_dim=32, output_dim=64, num_queries=4)
    load_stylear_release(tmp_path / "release", base, target)
    assert adapter_config(base).r == RANK and adapter_config(base).lora_alpha == RANK
    torch.testing.assert_close(base(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5, rtol=1e-4)
    for name, tensor in resampler.state_dict().items():
        torch.testing.assert_close(target.state_dict()[name], tensor)

    # One layer directly: q_proj(x) == W x + x @ A @ B.
    x = torch.randn(3, 64)
    q = base.model.layers[1].self_attn.q_proj
    manual = (
        x @ q.base_layer.weight.t()
        + x
        @ release["model.layers.1.self_attn.q_proj_lora.A"]
        @ release["model.layers.1.self_attn.q_proj_lora.B"]
    )
    torch.testing.assert_close(q(x), manual)


def test_release_keys_beyond_lora_are_ignored_and_reported(tmp_path, base, caplog):
    release = release_state_dict(base)
    extra = {
        "model.layers.0.mlp.up_proj_lora.A": torch.zeros(64, RANK),  # not a target of the release
        "image_proj.latents": torch.zeros(1, 4, 64),
        "step": torch.tensor(1000),
    }
    read = read_release_lora({**release, **extra})
    assert read.ignored_keys == tuple(extra)
    assert read.rank == RANK and read.state_dict.keys() == convert_release_lora(release)[0].keys()

    (tmp_path / "r").mkdir()
    save_file({**release, **extra}, str(tmp_path / "r" / "model.safetensors"))
    clean = copy.deepcopy(base)
    with caplog.at_level(logging.WARNING, logger="stylear_core.models.lora"):
        load_stylear_release(tmp_path / "r", base)
    assert "ignored 3 key(s)" in caplog.text and "image_proj.latents" in caplog.text
    load_stylear_release_from_dict(tmp_path / "clean", release, clean)
    ids = torch.randint(0, 64, (1, 6))
    assert torch.equal(base(input_ids=ids).logits, clean(input_ids=ids).logits)
    with pytest.raises(LoraLoadError, match="holds no factors"):
        read_release_lora(extra)


def load_stylear_release_from_dict(directory, release, backbone):
    directory.mkdir()
    save_file(release, str(directory / "model.safetensors"))
    return load_stylear_release(directory, backbone)


def test_release_with_a_missing_key_is_rejected(base):
    release = release_state_dict(base)
    partial = dict(release)
    del partial["lm_head.lm_head_lora.B"]
    with pytest.raises(LoraLoadError, match=r"lm_head\.lora_B\.weight"):
        convert_release_lora(partial)
    converted, rank = convert_release_lora(release)
    assert rank == RANK
    assert converted["lm_head.lora_A.weight"].shape == (RANK, 64)
    assert converted["lm_head.lora_B.weight"].shape == (VOCAB.vocab_size, RANK)


def test_loading_a_release_for_another_model_names_the_key(tmp_path, base):
    release = release_state_dict(base)
    release["model.layers.5.self_attn.q_proj_lora.A"] = torch.zeros(64, RANK)
    release["model.layers.5.self_attn.q_proj_lora.B"] = torch.zeros(RANK, 64)
    (tmp_path / "r").mkdir()
    save_file(release, str(tmp_path / "r" / "model.safetensors"))
    with pytest.raises(LoraLoadError, match=r"model\.layers\.5\.self_attn\.q_proj\.lora_"):
        load_stylear_release(tmp_path / "r", base)

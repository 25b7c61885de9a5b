"""CLIP style encoder and scorer on a tiny random open_clip ViT (and ViT-H/14 shapes on the meta device)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from stylear_core.models.clip import (
    TINY_CLIP_CONFIG,
    ClipBundle,
    ClipScorer,
    ClipVisionTower,
    build_clip,
    resolve_clip_checkpoint,
)


def random_images(n: int, size: tuple[int, int] = (80, 72), seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def bundle() -> ClipBundle:
    torch.manual_seed(0)
    return build_clip("tiny")


@pytest.fixture(scope="module")
def encoder(bundle: ClipBundle) -> ClipVisionTower:
    return ClipVisionTower(bundle.model.visual, bundle.preprocess)


def block_outputs(visual, pixels: torch.Tensor) -> list[torch.Tensor]:
    """Every block's output during open_clip's own full forward, captured with hooks."""
    captured: list[torch.Tensor] = []
    handles = [
        blk.register_forward_hook(lambda _m, _i, out: captured.append(out.detach().clone()))
        for blk in visual.transformer.resblocks
    ]
    try:
        with torch.no_grad():
            visual(pixels)
    finally:
        for h in handles:
            h.remove()
    return captured


def test_penultimate_features_equal_second_to_last_block_of_full_forward(bundle, encoder):
    pixels = encoder.preprocess(random_images(3))
    outs = block_outputs(bundle.model.visual, pixels)
    assert len(outs) == 3
    feats = encoder(pixels)
    torch.testing.assert_close(feats, outs[-2], rtol=0, atol=1e-6)
    # Not the last block, not the first, not the post-norm tokens.
    assert not torch.allclose(feats, outs[-1], atol=1e-3)
    assert not torch.allclose(feats, outs[0], atol=1e-3)


def test_penultimate_features_match_transformers_hidden_states_minus_2(bundle, encoder):
    """Same random weights in transformers' CLIP vision layout: hidden_states[-2] is what StyleAR feeds."""
    visual = bundle.model.visual
    vc, width = TINY_CLIP_CONFIG["vision_cfg"], TINY_CLIP_CONFIG["vision_cfg"]["width"]
    config = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=vc["layers"],
        num_attention_heads=width // vc["head_width"],
        image_size=vc["image_size"],
        patch_size=vc["patch_size"],
        projection_dim=TINY_CLIP_CONFIG["embed_dim"],
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )
    hf = CLIPVisionModelWithProjection(config).eval()
    sd = {
        "vision_model.embeddings.class_embedding": visual.class_embedding,
        "vision_model.embeddings.patch_embedding.weight": visual.conv1.weight,
        "vision_model.embeddings.position_embedding.weight": visual.positional_embedding,
        "vision_model.pre_layrnorm.weight": visual.ln_pre.weight,
        "vision_model.pre_layrnorm.bias": visual.ln_pre.bias,
        "vision_model.post_layernorm.weight": visual.ln_post.weight,
        "vision_model.post_layernorm.bias": visual.ln_post.bias,
        "visual_projection.weight": visual.proj.T,
    }
    for i, blk in enumerate(visual.transformer.resblocks):
        p = f"vision_model.encoder.layers.{i}."
        for name, w, b in zip(
            ("q_proj", "k_proj", "v_proj"),
            blk.attn.in_proj_weight.chunk(3),
            blk.attn.in_proj_bias.chunk(3),
            strict=True,
        ):
            sd[p + f"self_attn.{name}.weight"], sd[p + f"self_attn.{name}.bias"] = w, b
        pairs = {
            "self_attn.out_proj": blk.attn.out_proj,
            "layer_norm1": blk.ln_1,
            "layer_norm2": blk.ln_2,
            "mlp.fc1": blk.mlp.c_fc,
            "mlp.fc2": blk.mlp.c_proj,
        }
        for hf_name, mod in pairs.items():
            sd[p + hf_name + ".weight"], sd[p + hf_name + ".bias"] = mod.weight, mod.bias
    hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=True)

    pixels = encoder.preprocess(random_images(2, seed=1))
    with torch.no_grad():
        out = hf(pixel_values=pixels, output_hidden_states=True)
    torch.testing.assert_close(encoder(pixels), out.hidden_states[-2], rtol=1e-4, atol=1e-4)
    # The projected embedding agrees too, so the conversion above is the full tower.
    with torch.no_grad():
        torch.testing.assert_close(visual(pixels), out.image_embeds, rtol=1e-4, atol=1e-4)


def test_encoder_shape_and_sizes(encoder):
    feats = encoder.encode(random_images(2))
    assert encoder.width == 64
    assert encoder.image_size == 64
    assert encoder.num_tokens == 1 + (64 // 16) ** 2 == 17
    assert feats.shape == (2, 17, 64)
    assert feats.dtype == torch.float32


def test_encoder_is_frozen_and_gets_no_grads(bundle, encoder):
    assert not any(p.requires_grad for p in encoder.parameters())
    head = torch.nn.Linear(encoder.width, 1)
    parent = torch.nn.ModuleDict({"encoder": encoder, "head": head})
    parent.train()
    assert head.training and not encoder.visual.training

    pixels = encoder.preprocess(random_images(2)).requires_grad_(True)
    feats = encoder(pixels)
    assert not feats.requires_grad
    head(feats).sum().backward()
    assert head.weight.grad is not None
    assert all(p.grad is None for p in encoder.parameters())
    assert pixels.grad is None


def test_vit_h_14_gives_257_by_1280_on_meta():
    enc = ClipVisionTower.from_preset("ViT-H-14", device="meta")
    assert (enc.width, enc.num_tokens, enc.image_size) == (1280, 257, 224)
    assert len(enc.visual.transformer.resblocks) == 32
    feats = enc(torch.empty(2, 3, 224, 224, device="meta"))
    assert feats.shape == (2, 257, 1280)


def test_checkpoint_round_trip_through_file_and_directory(tmp_path):
    torch.manual_seed(1)
    source = build_clip("tiny").model
    sd = {k: v.contiguous() for k, v in source.state_dict().items()}
    torch.save(sd, tmp_path / "open_clip_pytorch_model.bin")
    st_dir = tmp_path / "st"
    st_dir.mkdir()
    save_file(sd, str(st_dir / "open_clip_model.safetensors"))

    torch.manual_seed(2)
    fresh = build_clip("tiny").model
    assert not torch.equal(fresh.visual.conv1.weight, source.visual.conv1.weight)

    for ckpt in (tmp_path / "open_clip_pytorch_model.bin", tmp_path, st_dir):
        loaded = build_clip("tiny", checkpoint=ckpt).model
        for k, v in sd.items():
            torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0, msg=k)

    pixels = torch.randn(1, 3, 64, 64)
    enc_a = ClipVisionTower.from_preset("tiny", checkpoint=tmp_path)
    enc_b = ClipVisionTower(source.visual, build_clip("tiny").preprocess)
    torch.testing.assert_close(enc_a(pixels), enc_b(pixels), rtol=0, atol=0)


def test_checkpoint_with_wrong_keys_is_rejected(tmp_path):
    sd = build_clip("tiny").model.state_dict()
    sd["visual.not_a_weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.bin")
    with pytest.raises(RuntimeError, match="visual.not_a_weight"):
        build_clip("tiny", checkpoint=tmp_path / "bad.bin")


def test_missing_checkpoint_is_a_clear_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_clip("ViT-H-14", checkpoint=tmp_path / "open_clip_pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="open_clip_pytorch_model.bin"):
        resolve_clip_checkpoint(tmp_path)  # a directory without weights
    (tmp_path / "model.safetensors").write_bytes(b"")  # transformers-layout name is not taken
    with pytest.raises(FileNotFoundError):
        resolve_clip_checkpoint(tmp_path)


def test_unknown_preset_is_rejected():
    with pytest.raises(ValueError, match="unknown CLIP preset"):
        build_clip("ViT-Z-99")


def test_tokenizer_is_bundled_bpe(bundle):
    ids = bundle.tokenizer(["a photo of a cat", "a painting"])
    assert ids.shape == (2, 77)
    assert ids[0, 0].item() == 49406  # <start_of_text>
    assert ids[0].tolist().count(49407) == 1  # one <end_of_text>, then padding
    assert not torch.equal(ids[0], ids[1])


def test_text_score_is_cosine_of_directly_computed_features(bundle):
    scorer = ClipScorer(bundle, batch_size=2)
    images, prompts = random_images(3, seed=3), ["a cat", "an oil painting of a harbour", "a red cube"]
    scores = scorer.text_score(images, prompts)
    with torch.no_grad():
        img = bundle.model.encode_image(torch.stack([bundle.preprocess(im) for im in images]))
        txt = bundle.model.encode_text(bundle.tokenizer(prompts))
    expected = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    assert scores.shape == (3,)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(scorer.image_features(images).norm(dim=-1), torch.ones(3), atol=1e-5)
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        scorer.text_score(images, prompts[:2])


def test_image_similarity_is_one_for_identical_images(bundle):
    scorer = ClipScorer(bundle)
    a, b = random_images(2, seed=4), random_images(2, seed=5)
    same = scorer.image_similarity(a, [im.copy() for im in a])
    torch.testing.assert_close(same, torch.ones(2), rtol=0, atol=1e-5)
    different = scorer.image_similarity(a, b)
    assert different.shape == (2,)
    assert (different < 0.9999).all()


def test_preprocess_matches_transformers_clip_image_processor(encoder):
    """StyleAR's reference code preprocesses with transformers' CLIPImageProcessor (shortest edge, centre
    crop, bicubic, OpenAI mean/std); open_clip's eval transform agrees up to one uint8 rounding step."""
    images = random_images(1, size=(120, 90), seed=6) + random_images(1, size=(200, 300), seed=7)
    hf = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    expected = hf(images=images, return_tensors="pt")["pixel_values"]
    ours = encoder.preprocess(images)
    assert ours.shape == expected.shape == (2, 3, 64, 64)
    assert (ours - expected).abs().max() < 0.02
    assert (ours - expected).abs().mean() < 1e-3

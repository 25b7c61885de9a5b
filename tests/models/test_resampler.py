"""StyleResampler: the released image_proj.pth layout, strict loading, and the IP-Adapter forward math."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from stylear_core.models.resampler import (
    ImageProjLoadError,
    StyleResampler,
    load_image_proj,
    stylear_resampler_7b,
    tiny_resampler,
)


def release_layout(
    *, depth: int, dim: int, inner: int, queries: int, embedding_dim: int, output_dim: int, ff_inner: int
) -> dict[str, tuple[int, ...]]:
    """Key -> shape of IP-Adapter's resampler.py state dict (as in StyleAR's image_proj.pth)."""
    layout = {
        "latents": (1, queries, dim),
        "proj_in.weight": (dim, embedding_dim),
        "proj_in.bias": (dim,),
        "proj_out.weight": (output_dim, dim),
        "proj_out.bias": (output_dim,),
        "norm_out.weight": (output_dim,),
        "norm_out.bias": (output_dim,),
    }
    for i in range(depth):
        layout |= {
            f"layers.{i}.0.norm1.weight": (dim,),
            f"layers.{i}.0.norm1.bias": (dim,),
            f"layers.{i}.0.norm2.weight": (dim,),
            f"layers.{i}.0.norm2.bias": (dim,),
            f"layers.{i}.0.to_q.weight": (inner, dim),
            f"layers.{i}.0.to_kv.weight": (2 * inner, dim),
            f"layers.{i}.0.to_out.weight": (dim, inner),
            f"layers.{i}.1.0.weight": (dim,),
            f"layers.{i}.1.0.bias": (dim,),
            f"layers.{i}.1.1.weight": (ff_inner, dim),
            f"layers.{i}.1.3.weight": (dim, ff_inner),
        }
    return layout


# StyleAR: dim 4096, depth 4, 12 heads x 64 = 768 inner, 16 queries, ViT-H 1280 in, 4096 out, ff 4 x 4096.
RELEASE_7B = release_layout(
    depth=4, dim=4096, inner=768, queries=16, embedding_dim=1280, output_dim=4096, ff_inner=16384
)
# tiny_resampler(embedding_dim=24, output_dim=48): dim 64, depth 2, 4 heads x 16, ff 2 x 64.
RELEASE_TINY = release_layout(
    depth=2, dim=64, inner=64, queries=4, embedding_dim=24, output_dim=48, ff_inner=128
)


def random_state_dict(layout: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=gen) * 0.1 for k, shape in layout.items()}


def test_7b_state_dict_is_the_release_layout():
    with torch.device("meta"):
        model = stylear_resampler_7b()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == RELEASE_7B
    assert 600e6 < sum(p.numel() for p in model.parameters()) < 620e6


def test_7b_forward_gives_16_tokens_of_4096_on_meta():
    with torch.device("meta"):
        model = stylear_resampler_7b()
        out = model(torch.empty(3, 257, 1280))
    assert out.shape == (3, 16, 4096)


def test_7b_loads_a_release_layout_state_dict_on_meta():
    with torch.device("meta"):
        model = stylear_resampler_7b()
    sd = {k: torch.empty(shape, device="meta") for k, shape in RELEASE_7B.items()}
    assert load_image_proj(sd, model) is model


def test_release_state_dict_loads_from_dict_pth_and_safetensors(tmp_path):
    sd = random_state_dict(RELEASE_TINY)
    torch.save(sd, tmp_path / "image_proj.pth")
    save_file(sd, str(tmp_path / "image_proj.safetensors"))
    for source in (sd, tmp_path / "image_proj.pth", str(tmp_path / "image_proj.safetensors")):
        model = load_image_proj(source, tiny_resampler(embedding_dim=24, output_dim=48))
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, sd[k], rtol=0, atol=0, msg=k)


def test_load_casts_to_the_resampler_dtype():
    sd = {k: v.to(torch.bfloat16) for k, v in random_state_dict(RELEASE_TINY).items()}
    model = load_image_proj(sd, tiny_resampler(embedding_dim=24, output_dim=48))
    assert model.latents.dtype == torch.float32
    torch.testing.assert_close(model.latents, sd["latents"].float(), rtol=0, atol=0)


def test_wrong_keys_and_shapes_are_rejected_by_name():
    model = tiny_resampler(embedding_dim=24, output_dim=48)
    before = model.latents.detach().clone()

    renamed = random_state_dict(RELEASE_TINY)
    renamed["layers.1.0.to_k.weight"] = renamed.pop("layers.1.0.to_kv.weight")
    with pytest.raises(ImageProjLoadError, match=r"missing keys: layers\.1\.0\.to_kv\.weight") as err:
        load_image_proj(renamed, model)
    assert "unexpected keys: layers.1.0.to_k.weight" in str(err.value)

    extra = random_state_dict(RELEASE_TINY) | {"layers.0.0.to_q.bias": torch.zeros(64)}
    with pytest.raises(ImageProjLoadError, match=r"unexpected keys: layers\.0\.0\.to_q\.bias"):
        load_image_proj(extra, model)

    prefixed = {f"image_proj.{k}": v for k, v in random_state_dict(RELEASE_TINY).items()}
    with pytest.raises(ImageProjLoadError, match="unexpected keys: image_proj.latents"):
        load_image_proj(prefixed, model)

    wrong_shape = random_state_dict(RELEASE_TINY) | {"latents": torch.zeros(1, 16, 64)}
    with pytest.raises(ImageProjLoadError, match=r"latents: checkpoint \(1, 16, 64\) vs model \(1, 4, 64\)"):
        load_image_proj(wrong_shape, model)

    assert torch.equal(model.latents, before)  # a rejected dict changes nothing


def test_missing_image_proj_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="image_proj"):
        load_image_proj(tmp_path / "image_proj.pth", tiny_resampler(embedding_dim=24, output_dim=48))


def reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, depth: int, heads: int) -> torch.Tensor:
    """IP-Adapter's Resampler written functionally from the state dict (attention via SDPA)."""

    def ln(t, prefix):
        return F.layer_norm(t, t.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"])

    def heads_first(t):
        return t.unflatten(-1, (heads, -1)).transpose(1, 2)

    latents = sd["latents"].expand(x.shape[0], -1, -1)
    x = F.linear(x, sd["proj_in.weight"], sd["proj_in.bias"])
    for i in range(depth):
        p = f"layers.{i}."
        xn, ln_lat = ln(x, p + "0.norm1"), ln(latents, p + "0.norm2")
        q = heads_first(ln_lat @ sd[p + "0.to_q.weight"].T)
        k, v = (torch.cat([xn, ln_lat], dim=1) @ sd[p + "0.to_kv.weight"].T).chunk(2, dim=-1)
        attn = F.scaled_dot_product_attention(q, heads_first(k), heads_first(v))
        latents = attn.transpose(1, 2).flatten(2) @ sd[p + "0.to_out.weight"].T + latents
        h = F.gelu(ln(latents, p + "1.0") @ sd[p + "1.1.weight"].T)
        latents = h @ sd[p + "1.3.weight"].T + latents
    out = F.linear(latents, sd["proj_out.weight"], sd["proj_out.bias"])
    return ln(out, "norm_out")


def test_forward_matches_functional_reference():
    sd = random_state_dict(RELEASE_TINY, seed=3)
    model = load_image_proj(sd, tiny_resampler(embedding_dim=24, output_dim=48))
    x = torch.randn(2, 17, 24)
    torch.testing.assert_close(model(x), reference_forward(sd, x, depth=2, heads=4), rtol=1e-5, atol=1e-5)


def test_latents_initialised_at_dim_to_minus_half():
    model = StyleResampler(
        dim=1024, depth=1, dim_head=64, heads=2, num_queries=64, embedding_dim=8, output_dim=8
    )
    assert model.latents.shape == (1, 64, 1024)
    assert abs(model.latents.std().item() - 1024**-0.5) < 0.002


def test_tiny_forward_shape_and_gradient_flow():
    model = tiny_resampler(embedding_dim=24, output_dim=48, num_queries=6)
    x = torch.randn(3, 17, 24, requires_grad=True)
    out = model(x)
    assert out.shape == (3, 6, 48)
    # norm_out makes the plain sum constant; weight the tokens so every parameter matters.
    (out * torch.randn_like(out)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0

"""Guidance and image-code sampling: exact CFG at scale 1, top-k, temperature, per-row seeds."""

from __future__ import annotations

import torch

from stylear_core.inference.sampling import BatchSampling, guided_logits, sample_codes


def settings(top_k, temperature, seeds, cfg=None, width=16):
    cfg = cfg or [4.0] * len(top_k)
    return BatchSampling.build(cfg, top_k, temperature, seeds, codebook_size=width, device="cpu")


def test_guidance_formula_and_exact_scale_one():
    cond = torch.randn(3, 10)
    uncond = torch.randn(3, 10)
    out = guided_logits(cond, uncond, torch.tensor([1.0, 4.0, 0.0]))
    assert torch.equal(out[0], cond[0])
    torch.testing.assert_close(out[1], uncond[1] + 4.0 * (cond[1] - uncond[1]))
    assert torch.equal(out[2], uncond[2])
    assert guided_logits(cond, None, torch.tensor([4.0, 4.0, 4.0])) is cond


def test_greedy_rows_take_the_argmax_and_leave_their_generator_alone():
    logits = torch.randn(3, 16)
    s = settings([1, 2000, 5], [1.0, 0.0, 1.0], [0, 1, 2])
    state = [g.get_state() for g in s.generators]
    codes = sample_codes(logits, s)
    assert codes[0] == logits[0].argmax() and codes[1] == logits[1].argmax()
    assert torch.equal(s.generators[0].get_state(), state[0])
    assert torch.equal(s.generators[1].get_state(), state[1])
    assert not torch.equal(s.generators[2].get_state(), state[2])
    assert s.top_k.tolist() == [1, 16, 5]  # clamped to the codebook


def test_draws_follow_the_top_k_softmax():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.5, 0.0, -1.0]])
    s = BatchSampling.build([1.0], [3], [1.0], [123], codebook_size=6, device="cpu")
    counts = torch.zeros(6)
    for _ in range(3000):
        counts[sample_codes(logits, s)] += 1
    assert counts[3:].sum() == 0  # outside the top 3
    expected = torch.softmax(logits[0, :3], dim=0)
    torch.testing.assert_close(counts[:3] / counts.sum(), expected, atol=0.03, rtol=0)


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([[1.0, 0.0, 0.0, 0.0]])

    def top_share(temperature: float) -> float:
        s = BatchSampling.build([1.0], [4], [temperature], [7], codebook_size=4, device="cpu")
        return sum(int(sample_codes(logits, s)[0] == 0) for _ in range(1500)) / 1500

    cold, warm, hot = top_share(0.25), top_share(1.0), top_share(5.0)
    assert cold > 0.9 and hot < warm < cold
    assert abs(warm - torch.softmax(logits[0], 0)[0].item()) < 0.05


def test_a_rows_draws_do_not_depend_on_its_neighbours_settings():
    logits = torch.randn(2, 16, generator=torch.Generator().manual_seed(3))

    def row_zero_draws(neighbour_k: int, neighbour_t: float, neighbour_seed: int) -> list[int]:
        s = settings([6, neighbour_k], [1.0, neighbour_t], [42, neighbour_seed])
        return [int(sample_codes(logits, s)[0]) for _ in range(20)]

    alone = row_zero_draws(2, 1.0, 0)
    assert len(set(alone)) > 1  # really sampling
    for neighbour in [(16, 1.0, 99), (1, 1.0, 5), (3, 0.2, 7)]:
        assert row_zero_draws(*neighbour) == alone

"""The DPO loss against the paper's formula, and the LR schedule and DeepSpeed config it trains under."""

from __future__ import annotations

import math

import pytest
import torch

from stylear_core.training.deepspeed_config import build_deepspeed_config
from stylear_core.training.losses import dpo_loss
from stylear_core.training.schedule import warmup_cosine_factor, warmup_cosine_scheduler


def test_dpo_loss_matches_the_formula_on_fixed_log_probs():
    pc = torch.tensor([-10.0, -20.0, -5.0])
    pr = torch.tensor([-12.0, -19.0, -5.0])
    rc = torch.tensor([-11.0, -20.0, -6.0])
    rr = torch.tensor([-11.0, -21.0, -4.0])
    beta = 0.5
    terms = dpo_loss(pc, pr, rc, rr, beta=beta)
    for i in range(3):
        logit = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i]))
        assert terms.losses[i].item() == pytest.approx(-math.log(1 / (1 + math.exp(-logit.item()))), rel=1e-6)
    # Rewards beta * (log pi - log pi_ref): row 0 chosen +0.5, rejected -0.5.
    assert terms.chosen_rewards.tolist() == pytest.approx([0.5, 0.0, 0.5])
    assert terms.rejected_rewards.tolist() == pytest.approx([-0.5, 1.0, -0.5])
    assert terms.accuracy.item() == pytest.approx(2 / 3)
    assert terms.reward_margin.item() == pytest.approx((1.0 - 1.0 + 1.0) / 3)


def test_dpo_loss_is_log2_when_policy_equals_reference_and_smoothing_mixes_both_directions():
    logps = torch.tensor([-3.0, -7.0])
    assert dpo_loss(logps, logps + 1, logps, logps + 1).loss.item() == pytest.approx(math.log(2))
    pc, pr, ref = torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0])
    eps, beta = 0.2, 0.3
    z = beta * ((pc - ref) - (pr - ref))
    expected = -(1 - eps) * torch.nn.functional.logsigmoid(z) - eps * torch.nn.functional.logsigmoid(-z)
    assert dpo_loss(pc, pr, ref, ref, beta, eps).loss.item() == pytest.approx(expected.item())


def test_dpo_gradient_flows_to_policy_only():
    pc = torch.tensor([-4.0], requires_grad=True)
    rc = torch.tensor([-5.0], requires_grad=True)
    dpo_loss(pc, torch.tensor([-4.0]), rc, torch.tensor([-4.0])).loss.backward()
    assert pc.grad is not None and pc.grad.item() < 0  # raising the chosen log-prob lowers the loss
    assert rc.grad is None


@pytest.mark.parametrize("beta", [0.0, -1.0])
def test_dpo_rejects_non_positive_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=beta)


def test_warmup_then_cosine_to_the_floor():
    f = [warmup_cosine_factor(s, warmup_steps=4, total_steps=14, min_lr_ratio=0.1) for s in range(16)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f[4] == pytest.approx(1.0)
    assert f[9] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert f[14] == pytest.approx(0.1) and f[15] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))


def test_scheduler_drives_the_optimizer_lr():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = warmup_cosine_scheduler(opt, warmup_steps=2, total_steps=6, min_lr_ratio=0.0)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:3] == pytest.approx([1.0, 2.0, 2.0])
    assert lrs[-1] < lrs[3] < lrs[2]


def test_deepspeed_config_batch_geometry_and_stage3_settings():
    cfg = build_deepspeed_config(
        3, micro_batch_size=2, grad_accum_steps=4, world_size=8, precision="bf16", grad_clip=0.5
    )
    assert cfg["train_batch_size"] == 64
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["bf16"]["enabled"] and cfg["gradient_clipping"] == 0.5
    assert cfg["zero_allow_untested_optimizer"] and "optimizer" not in cfg
    plain = build_deepspeed_config(2, 1, 1, 2, grad_clip=0.0)
    assert "gradient_clipping" not in plain and not plain["bf16"]["enabled"]
    assert "stage3_prefetch_bucket_size" not in plain["zero_optimization"]
    with pytest.raises(ValueError):
        build_deepspeed_config(4, 1, 1, 1)

"""Preference-optimisation losses on summed image-token log-probabilities."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class DPOTerms:
    """Per-row DPO quantities, each ``(B,)``: ``losses``, and the implicit rewards
    ``beta * (log pi - log pi_ref)`` of the chosen and rejected samples."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    @property
    def loss(self) -> torch.Tensor:
        """Mean loss over the batch (the value to back-propagate)."""
        return self.losses.mean()

    @property
    def reward_margin(self) -> torch.Tensor:
        """Mean of ``chosen_reward - rejected_reward``."""
        return (self.chosen_rewards - self.rejected_rewards).mean()

    @property
    def accuracy(self) -> torch.Tensor:
        """Fraction of rows whose chosen reward exceeds the rejected one."""
        return (self.chosen_rewards > self.rejected_rewards).float().mean()


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> DPOTerms:
    """Sigmoid DPO loss of Rafailov et al., "Direct Preference Optimization: Your Language Model is
    Secretly a Reward Model" (NeurIPS 2023, arXiv:2305.18290), eq. 7::

        L = -log sigmoid(beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))])

    Takes the summed log-probabilities ``(B,)`` of the chosen (``y_w``) and rejected (``y_l``) image
    tokens under the policy and the frozen reference, the temperature ``beta`` and an optional
    ``label_smoothing`` eps (conservative DPO: ``(1-eps) * L(w, l) + eps * L(l, w)``). The reference
    log-probabilities carry no gradient. Gives :class:`DPOTerms`.
    """
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_logratio = policy_chosen_logps - reference_chosen_logps.detach()
    rejected_logratio = policy_rejected_logps - reference_rejected_logps.detach()
    logits = beta * (chosen_logratio - rejected_logratio)
    losses = -F.logsigmoid(logits) * (1.0 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing
    return DPOTerms(
        losses=losses,
        chosen_rewards=beta * chosen_logratio.detach(),
        rejected_rewards=beta * rejected_logratio.detach(),
    )

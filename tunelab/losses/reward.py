"""Reward-model loss: the Bradley-Terry model of pairwise preferences.

Ouyang et al. 2022 ("Training language models to follow instructions with human feedback"),
after Bradley & Terry 1952: the probability that response c is preferred to r for prompt x is
sigma(r_theta(x, c) - r_theta(x, r)), so the negative log-likelihood of a pair is

    L = -log sigma(r_c - r_r - m)

with an optional margin m per pair (Llama 2, Touvron et al. 2023: a larger required gap for
pairs whose preference is stronger). `center_coefficient` adds c * (r_c + r_r)^2, which keeps the
rewards centred on zero (Eisenstein et al. 2023; TRL's `center_rewards_coefficient`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coefficient: float = 0.0,
) -> torch.Tensor:
    """Per-pair loss -log sigma(r_c - r_r - m) [+ c (r_c + r_r)^2].

    chosen_rewards, rejected_rewards: (B,); margin: (B,) or None. Returns (B,).
    """
    difference = chosen_rewards - rejected_rewards  # (B,)
    if margin is not None:
        difference = difference - margin
    loss = -F.logsigmoid(difference)  # (B,)
    if center_coefficient:
        loss = loss + center_coefficient * (chosen_rewards + rejected_rewards) ** 2
    return loss


def pairwise_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Per-pair 1.0 where the chosen response gets the higher reward, else 0.0: (B,) -> (B,)."""
    return (chosen_rewards > rejected_rewards).float()

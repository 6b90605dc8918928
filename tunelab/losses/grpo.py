"""Group Relative Policy Optimization (Shao et al. 2024, "DeepSeekMath"), with the loss
aggregations of its successors.

For completion i of a prompt's group, token t, with group advantage A_i (see
`tunelab.rl.advantages.group_advantages`), ratio rho_{i,t} = pi / pi_old and the k3 estimate of
KL(pi || pi_ref) (see `kl.py`):

    l_{i,t} = -min(rho A_i, clip(rho, 1 - eps_low, 1 + eps_high) A_i) + beta * k3_{i,t}

Aggregation over the batch (n_i = tokens of completion i, N completions, L = max new tokens):

    sequence  (GRPO):          1/N sum_i (1/n_i) sum_t l_{i,t}
    token     (DAPO, Yu et al. 2025):  sum_{i,t} l_{i,t} / sum_i n_i
    constant  (Dr. GRPO, Liu et al. 2025): sum_{i,t} l_{i,t} / (N L)

`sequence` weighs every completion alike, so tokens of long completions count less; `token`
weighs every token alike; `constant` has no length bias at all. Each is returned as a
(sum, units) pair: a step split into micro-batches divides the sum of sums by the sum of units
and gets exactly the loss of the whole batch.
"""

from __future__ import annotations

from typing import Literal

import torch

from tunelab.losses.kl import kl_k3
from tunelab.losses.ppo import clipped_policy_loss

Aggregation = Literal["sequence", "token", "constant"]


def grpo_per_token_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """l_{i,t} of the module docstring and where the ratio is clipped.

    logprobs, old_logprobs, ref_logprobs: (B, T); advantages: (B,). Returns (loss (B, T), clipped (B, T)).
    """
    loss, clipped = clipped_policy_loss(logprobs, old_logprobs, advantages.unsqueeze(1), clip_low, clip_high)
    if beta:
        if ref_logprobs is None:
            raise ValueError("beta > 0 needs the reference log-probs")
        loss = loss + beta * kl_k3(logprobs, ref_logprobs)
    return loss, clipped


def aggregate_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    aggregation: Aggregation = "sequence",
    max_completion_length: int | None = None,
) -> tuple[torch.Tensor, float]:
    """(loss sum, units) of the chosen aggregation; the batch loss is sum / units.

    per_token_loss, mask: (B, T). `constant` needs `max_completion_length`.
    """
    mask = mask.to(per_token_loss.dtype)
    token_sums = (per_token_loss * mask).sum(dim=1)  # (B,)
    if aggregation == "sequence":
        return (token_sums / mask.sum(dim=1).clamp(min=1.0)).sum(), float(per_token_loss.shape[0])
    if aggregation == "token":
        return token_sums.sum(), float(mask.sum())
    if aggregation == "constant":
        if max_completion_length is None:
            raise ValueError("the constant aggregation needs max_completion_length")
        return token_sums.sum(), float(per_token_loss.shape[0] * max_completion_length)
    raise ValueError(f"unknown aggregation {aggregation!r}; choose sequence, token or constant")

"""PPO's clipped surrogate losses (Schulman et al. 2017, "Proximal Policy Optimization
Algorithms"), per token, as in RLHF (Ouyang et al. 2022; TRL's PPO trainer).

Policy, with the ratio rho_t = pi(a_t) / pi_old(a_t) and advantage A_t:

    L^pi_t = max(-A_t rho_t, -A_t clip(rho_t, 1 - eps_low, 1 + eps_high))

(eps_high = eps_low unless given: DAPO's "clip-higher", Yu et al. 2025). The token is *clipped*
when the second term is the larger one, so its gradient is zero.

Value, with the value at rollout time V_old, the new prediction V and the return R:

    V^clip_t = V_old + clip(V - V_old, -eps_v, eps_v)
    L^V_t    = 1/2 max((V - R)^2, (V^clip_t - R)^2)

The recipes average these over the response tokens of a mini-batch (`masked_mean`).
"""

from __future__ import annotations

import torch


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped policy loss and where clipping is active.

    logprobs, old_logprobs: (B, T); advantages: (B, T) or (B, 1). Returns (loss (B, T), clipped (B, T) float).
    """
    clip_high = clip_low if clip_high is None else clip_high
    ratio = torch.exp(logprobs - old_logprobs)  # (B, T)
    unclipped = -advantages * ratio  # (B, T)
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)  # (B, T)
    return torch.max(unclipped, clipped), (clipped > unclipped).float()


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip_range: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped value loss and where clipping is active.

    values, old_values, returns: (B, T). Returns (loss (B, T), clipped (B, T) float).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)  # (B, T)
    loss_unclipped = (values - returns) ** 2  # (B, T)
    loss_clipped = (clipped_values - returns) ** 2  # (B, T)
    return 0.5 * torch.max(loss_unclipped, loss_clipped), (loss_clipped > loss_unclipped).float()


def approx_policy_kl(logprobs: torch.Tensor, old_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token 1/2 (log pi - log pi_old)^2, how far an update moved the policy (for logging): (B, T)."""
    return 0.5 * (logprobs - old_logprobs) ** 2

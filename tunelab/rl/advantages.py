"""From rewards to advantages: masked statistics, per-token PPO rewards, GAE, GRPO group advantages.

Masked statistics over the response tokens (mask m in {0, 1}):

    mean_m(x) = sum(x m) / sum(m)
    var_m(x)  = mean_m((x - mean_m(x))^2) * n / (n - 1),   n = sum(m)     (Bessel-corrected)
    whiten(x) = (x - mean_m(x)) / sqrt(var_m(x) + 1e-8)                    (advantage whitening)

PPO rewards per token (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
Preferences"): a KL penalty at every response token and the sequence score at its last token,

    r_t = -kl_coef * KL_t + [t = last] * score

Generalised advantage estimation (Schulman et al. 2016, "High-Dimensional Continuous Control
Using Generalized Advantage Estimation"), with V = 0 after the last token:

    delta_t = r_t + gamma V_{t+1} - V_t,     A_t = delta_t + gamma lambda A_{t+1},     R_t = A_t + V_t

GRPO group advantages (Shao et al. 2024, "DeepSeekMath"): G completions per prompt, rewards r_i,

    A_i = (r_i - mean_group(r)) / (std_group(r) + eps)      (std Bessel-corrected, as TRL)

or without the division (`scale=False`, Dr. GRPO, Liu et al. 2025).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Sum = Callable[[torch.Tensor], torch.Tensor]
"""A tensor summed over the ranks of a distributed run (`Parallel.all_sum`); one process: identity."""


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def masked_mean(
    values: torch.Tensor, mask: torch.Tensor, dim: int | None = None, all_sum: Sum = _local
) -> torch.Tensor:
    """Mean of `values` where `mask` is set, over all elements (of every rank, through `all_sum`)
    or along `dim` (this rank's rows). values, mask: (B, T)."""
    mask = mask.to(values.dtype)
    if dim is None:
        sums = all_sum(torch.stack([(values * mask).sum(), mask.sum()]))
        return sums[0] / sums[1].clamp(min=1.0)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(
    values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, all_sum: Sum = _local
) -> torch.Tensor:
    """Variance of `values` where `mask` is set (Bessel-corrected unless `unbiased=False`); a scalar,
    over every rank's elements through `all_sum`."""
    mean = masked_mean(values, mask, all_sum=all_sum)
    variance = masked_mean((values - mean) ** 2, mask, all_sum=all_sum)
    count = all_sum(mask.to(values.dtype).sum())
    if unbiased and count > 1:
        variance = variance * count / (count - 1)
    return variance


def masked_whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    all_sum: Sum = _local,
) -> torch.Tensor:
    """(values - mean) / sqrt(var + eps) with masked statistics (over every rank's elements through
    `all_sum`); the mean is added back unless `shift_mean`. Positions outside the mask are set to 0.
    (B, T) -> (B, T)."""
    mean, variance = masked_mean(values, mask, all_sum=all_sum), masked_var(values, mask, all_sum=all_sum)
    whitened = (values - mean) * torch.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last set position of each row of `mask` (0 for an empty row): (B, T) -> (B,)."""
    positions = torch.arange(mask.shape[1], device=mask.device)  # (T,)
    return (mask.long() * (positions + 1)).argmax(dim=1) * mask.any(dim=1)


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """r_t = -kl_coef * KL_t on response tokens, plus the score at each response's last token.

    scores: (B,); kl, mask: (B, T). Returns (B, T), zero outside the mask.
    """
    mask = mask.to(kl.dtype)
    rewards = -kl_coef * kl * mask  # (B, T)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns over response tokens (see the module docstring).

    rewards, values, mask: (B, T), the mask a prefix of each row (a response and its padding).
    Values and rewards outside the mask count as 0, so the value after the last token is 0.
    Returns (advantages (B, T), returns (B, T)), both zero outside the mask.
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    length = rewards.shape[1]
    advantages = torch.zeros_like(rewards)  # (B, T)
    running = torch.zeros_like(rewards[:, 0])  # (B,), A_{t+1}
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """GRPO advantages: each reward minus its group's mean [divided by the group's std + eps].

    rewards: (N,), N = prompts x group_size, the completions of a prompt consecutive. Returns (N,).
    """
    grouped = rewards.view(-1, group_size)  # (P, G)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)  # (P, G)
    if scale:
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped[:, :1])
        advantages = advantages / (std + eps)
    return advantages.reshape(-1)

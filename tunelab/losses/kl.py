"""Per-token KL estimators between the policy pi and the reference pi_ref, from samples of pi.

Schulman (2020), "Approximating KL Divergence". With x ~ pi and the log-ratio
log r = log pi_ref(x) - log pi(x):

    k1 = -log r                  unbiased, high variance, can be negative   (PPO's reward penalty)
    k2 = (log r)^2 / 2           biased, low variance, >= 0
    k3 = (r - 1) - log r         unbiased, low variance, >= 0                (GRPO's loss penalty)

Each estimates KL(pi || pi_ref) = E_pi[log pi - log pi_ref] per token; summed over the tokens of a
response it estimates the KL of the response distributions.
"""

from __future__ import annotations

from typing import Literal

import torch

Estimator = Literal["k1", "k2", "k3"]


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log pi - log pi_ref. logprobs, ref_logprobs: (B, T) -> (B, T)."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 = (log pi - log pi_ref)^2 / 2. (B, T) -> (B, T)."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1. (B, T) -> (B, T)."""
    log_ratio = ref_logprobs - logprobs  # (B, T), log r
    return torch.exp(log_ratio) - log_ratio - 1.0


def per_token_kl(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: Estimator = "k1"
) -> torch.Tensor:
    """The chosen estimator (`k1`, `k2` or `k3`) at every token: (B, T) -> (B, T)."""
    functions = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}
    if estimator not in functions:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {sorted(functions)}")
    return functions[estimator](logprobs, ref_logprobs)

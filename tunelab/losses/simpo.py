"""SimPO: Simple Preference Optimization with a reference-free reward (Meng, Xia & Chen 2024,
"SimPO: Simple Preference Optimization with a Reference-Free Reward").

The implicit reward of a response is its length-normalised log-probability under the policy
alone, (beta / n) log pi(y|x), with n its completion tokens, and a pair must be separated by a
target margin gamma (`simpo_gamma`):

    avg(y) = log pi(y|x) / n_y
    L      = -log sigma(beta (avg(c) - avg(r)) - gamma)

No reference policy enters. As in TRL's CPO trainer (which hosts SimPO), label smoothing eps gives
-(1 - eps) log sigma(z) - eps log sigma(-z) with z = beta (avg(c) - avg(r)) - gamma, and
`cpo_alpha` adds alpha times the chosen response's negative log-likelihood per token, -avg(c)
(CPO, Xu et al. 2024; the paper's SimPO has alpha = 0). TRL averages that NLL over all chosen
tokens of a batch; here it is averaged per response, so that a pair's loss does not depend on the
other pairs of its micro-batch (gradient accumulation stays exact).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def simpo_loss(
    chosen_avg_logps: torch.Tensor,
    rejected_avg_logps: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    cpo_alpha: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair SimPO loss and its rewards.

    chosen_avg_logps, rejected_avg_logps: (B,) policy log-probs averaged over each response's
    completion tokens. Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)); the rewards
    are beta * avg(y), detached.
    """
    z = beta * (chosen_avg_logps - rejected_avg_logps) - gamma  # (B,)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    if cpo_alpha:
        losses = losses - cpo_alpha * chosen_avg_logps
    return losses, beta * chosen_avg_logps.detach(), beta * rejected_avg_logps.detach()

"""ORPO: Monolithic Preference Optimization without Reference Model (Hong, Lee & Thorne 2024).

One loss does supervised fine-tuning and preference alignment at once, with no reference policy.
With P(y|x) = exp(avg(y)) the length-normalised likelihood (avg(y) = log pi(y|x) / n_y, the mean
log-prob of the n_y completion tokens), the odds of a response are P / (1 - P), and

    log odds(y)  = avg(y) - log(1 - exp(avg(y)))
    L_OR         = -log sigma(log odds(c) - log odds(r))                 (Eq. 7)
    L            = -avg(c) + lambda L_OR                                  (Eq. 6)

-avg(c) is the SFT negative log-likelihood of the chosen response per token; lambda is `beta`
(TRL's name; the paper's lambda, the official code's alpha). log(1 - e^x) is computed stably
(log1p(-e^x) below -log 2, log(-expm1(x)) above). Where we depart from TRL's ORPOTrainer: TRL
averages the NLL over every chosen token of a batch, prompt tokens included; here it is the chosen
response's tokens only (the paper's L_SFT), averaged per response, so that a pair's loss does not
depend on the other pairs of its micro-batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation: (...) -> (...)."""
    x = x.clamp(max=-1e-7)  # avg log-prob 0 (a certain response) would give log 0
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, beta: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair ORPO loss -avg(c) - beta log sigma(log odds ratio).

    chosen_avg_logps, rejected_avg_logps: (B,) policy log-probs averaged over each response's
    completion tokens (computed in float32). Returns (losses (B,), chosen_rewards (B,),
    rejected_rewards (B,), log_odds_ratio (B,)); the rewards are beta * avg(y), detached (as TRL logs
    them), the log odds ratio is detached.
    """
    chosen, rejected = chosen_avg_logps.float(), rejected_avg_logps.float()
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))  # (B,)
    losses = -chosen - beta * F.logsigmoid(log_odds)  # (B,)
    return losses, beta * chosen.detach(), beta * rejected.detach(), log_odds.detach()

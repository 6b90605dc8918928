"""Direct Preference Optimization (Rafailov et al. 2023, "Direct Preference Optimization: Your
Language Model is Secretly a Reward Model").

With log pi(y|x) the summed log-probability of the completion tokens of y, the implicit reward of
a completion is r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)), and for a pair (chosen c,
rejected r):

    Delta = (log pi(c) - log pi_ref(c)) - (log pi(r) - log pi_ref(r))
    L     = -log sigma(beta * Delta)

Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences") assumes each label is
flipped with probability eps (`label_smoothing`):

    L_eps = -(1 - eps) log sigma(beta * Delta) - eps log sigma(-beta * Delta)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss and the implicit rewards.

    Every input is (B,): summed completion log-probs under the policy and the reference.
    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)); the rewards are
    beta * (policy - reference) log-probs, detached (for logging).
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    logits = beta * (chosen_logratios - rejected_logratios)  # (B,)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair IPO loss (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning
    from Human Preferences", Eq. 17) and the implicit rewards.

    IPO regresses the log-ratio margin onto a fixed target 1 / (2 tau) instead of pushing it to
    infinity; tau is `beta`. As TRL does (and as the IPO authors confirmed to TRL), each response's
    log-ratio is averaged over its n completion tokens, so beta means the same whatever the length:

        h = (log pi(c) - log pi_ref(c)) / n_c - (log pi(r) - log pi_ref(r)) / n_r
        L = (h - 1 / (2 beta))^2

    Log-prob inputs are (B,) sums over the completion tokens; lengths are (B,) token counts
    (clamped to at least 1). Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)); the
    rewards are beta * the summed log-ratios, detached, as for DPO (and as TRL logs them).
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    h = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
    losses = (h - 1.0 / (2.0 * beta)) ** 2  # (B,)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()

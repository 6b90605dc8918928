"""KTO: model alignment as prospect-theoretic optimization (Ethayarajh et al. 2024, "KTO: Model
Alignment as Prospect Theoretic Optimization"), on unpaired examples labelled desirable or not.

With the implicit reward r(x, y) = log pi(y|x) - log pi_ref(y|x) (summed completion log-probs)
and a reference point z0, the loss of an example is (Eq. 7, with TRL's naming)

    desirable y:    L = lambda_D (1 - sigma(beta (r(x, y) - z0)))
    undesirable y:  L = lambda_U (1 - sigma(beta (z0 - r(x, y))))

(lambda_D, lambda_U: `desirable_weight`, `undesirable_weight`). z0 estimates KL(pi || pi_ref) from
m mismatched pairs (x_j, y'_j), the completion of another example of the batch after prompt x_j,
as TRL does, and is not differentiated:

    z0 = max(0, (1/m) sum_j [log pi(y'_j|x_j) - log pi_ref(y'_j|x_j)])
"""

from __future__ import annotations

import torch


def kto_reference_point(kl_logratio_sum: torch.Tensor, count: int) -> torch.Tensor:
    """z0 = max(0, sum_j (log pi - log pi_ref)(y'_j|x_j) / m) from the sum over the m mismatched
    pairs (a scalar, summed over micro-batches and processes by the caller); detached."""
    return (kl_logratio_sum.detach() / max(count, 1)).clamp(min=0)


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    reference_point: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example KTO loss and implicit reward.

    policy_logps, ref_logps: (B,) summed completion log-probs; desirable: (B,) bool labels;
    reference_point: z0, a scalar. Returns (losses (B,), rewards (B,) = beta r(x, y), detached).
    """
    logratios = policy_logps - ref_logps  # (B,)
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (logratios - reference_point)))
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (reference_point - logratios)))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)  # (B,)
    return losses, beta * logratios.detach()

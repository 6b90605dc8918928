"""Causal language-model loss, summed over target tokens.

    L_sum = - sum_{b,t : y[b,t+1] != -100} log softmax(h[b,t] W_head^T)[y[b,t+1]]

The sum (not the mean) is returned together with the count of target tokens, so that a training
step can divide by the target tokens of *all* its accumulated micro-batches (batch 8 x 1 gives the
same step as 1 x 8).

`chunked_lm_loss` computes the same sum without the full (B, T, V) logits tensor: it gathers the
hidden states of target positions only and runs the LM head and cross-entropy on chunks of them,
so memory for logits is O(chunk x V) instead of O(B x T x V).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over positions whose (shifted) label is not -100.

    logits: (B, T, V); labels: (B, T). Returns a float32 scalar.
    """
    shift_logits = logits[:, :-1, :].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:]  # (B, T-1)
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def chunked_lm_loss_sum(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    chunk_size: int = 1024,
    softcap: float | None = None,
) -> torch.Tensor:
    """The same sum as `lm_loss_sum`, from final hidden states, only at target positions, in chunks.

    hidden: (B, T, H) final-norm hidden states; head: the LM head module, (n, H) -> (n, V) (a plain
    Linear, or one wrapped by a method); labels: (B, T). `softcap` applies `c * tanh(z / c)` to the
    logits, as models with final-logit soft-capping do.
    """
    shift_hidden = hidden[:, :-1, :]  # (B, T-1, H)
    shift_labels = labels[:, 1:]  # (B, T-1)
    keep = shift_labels != IGNORE_INDEX  # (B, T-1)
    targets_hidden = shift_hidden[keep]  # (N, H)
    targets = shift_labels[keep]  # (N,)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_size):
        logits = head(targets_hidden[start : start + chunk_size]).float()  # (n, V)
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        total = total + F.cross_entropy(logits, targets[start : start + chunk_size], reduction="sum")
    return total

"""Log-probabilities of sampled answers under the policy and under the reference policy.

A rollout row is a left-padded prompt of P columns followed by the answer's R columns; the answer's
token t is scored from position P + t - 1 (tunelab/logprobs.py), at the sampling temperature tau, so
that the log-probs are those of the distribution the answers were drawn from:

    log pi(y_t | x, y_<t) = log_softmax(W h_{P+t-1} / tau)[y_t],   t = 0 .. R-1
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from tunelab.logprobs import logprobs_from_hidden
from tunelab.reference import Reference, reference_logprobs
from tunelab.rl.rollouts import Rollout
from tunelab.rl.updates import split


def answer_logprobs(
    model: PreTrainedModel,
    hidden: torch.Tensor,
    rows: dict[str, torch.Tensor],
    prompt_length: int,
    temperature: float,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The answers' (log-probs (n, R), entropy (n, R) or None) from the final hidden states
    `hidden` (n, P+R, H) of rollout rows `rows` (`Rollout.rows`)."""
    logprobs, entropy = logprobs_from_hidden(
        model, hidden, rows["input_ids"], rows["target_mask"], temperature, with_entropy
    )
    p = prompt_length
    return logprobs[:, p:], entropy[:, p:] if with_entropy else None


@torch.no_grad()
def reference_answer_logprobs(
    reference: Reference, rollout: Rollout, temperature: float, micro_batches: int
) -> torch.Tensor:
    """log pi_ref of every rollout's answer tokens, computed in `micro_batches` chunks: (N, R)."""
    chunks = split(torch.arange(len(rollout.input_ids)), micro_batches)
    p = rollout.prompt_length
    return torch.cat(
        [reference_logprobs(reference, **rollout.rows(c), temperature=temperature)[:, p:] for c in chunks]
    )

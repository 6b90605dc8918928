"""What a model assigns to tokens: log-probabilities, entropy, and the summed next-token loss.

Every objective scores tokens through these functions. Log-probabilities come from the final hidden
states h (after the last norm) and the LM head, computed only where they are needed and in chunks
(never the whole (B, T, V) logits):

    log pi(x_t | x_<t) = log_softmax(W h_{t-1} / tau)[x_t]
    H_t = logsumexp(z) - sum_v softmax(z)_v z_v,   z = W h_{t-1} / tau         (entropy)

tau is the sampling temperature (1 outside PPO/GRPO), so that the log-probs are those of the
distribution the rollouts were sampled from. Position ids follow the attention mask
(cumsum - 1), so a left-padded prompt sees the positions it had during generation. The SFT loss,

    L_sum = - sum_{t: label_t != -100} log p(label_t | x_<t),

is summed over a padded or packed batch (`tunelab.data.packing`), with the chunked cross-entropy of
`tunelab.losses.causal_lm`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from tunelab.data.packing import model_inputs
from tunelab.losses.causal_lm import chunked_lm_loss_sum, lm_loss_sum
from tunelab.models import final_hidden_states


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens, as `generate` does: (B, T) -> (B, T)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def final_hidden(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Final-norm hidden states of every position: (B, T) -> (B, T, H)."""
    return final_hidden_states(
        model, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask)
    )


def logprobs_from_hidden(
    model: PreTrainedModel,
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    target_mask: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(x_t | x_<t) at every target position t (and the entropy there), 0 elsewhere.

    hidden: (B, T, H); input_ids: (B, T); target_mask: (B, T), true where token t is scored
    (t >= 1). Returns (logprobs (B, T) float32, entropy (B, T) float32 or None).
    """
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    keep = target_mask[:, 1:].bool()  # (B, T-1): predicting token t+1 from position t
    states = hidden[:, :-1][keep]  # (N, H)
    targets = input_ids[:, 1:][keep]  # (N,)
    picked, entropies = [], []
    for start in range(0, targets.numel(), chunk_size):
        logits = head(states[start : start + chunk_size]).float()  # (n, V)
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        logits = logits / temperature
        logp = torch.log_softmax(logits, dim=-1)  # (n, V)
        picked.append(logp.gather(1, targets[start : start + chunk_size, None]).squeeze(1))
        if with_entropy:
            entropies.append(-(logp.exp() * logp).sum(-1))
    empty = hidden.new_zeros(keep.shape, dtype=torch.float32)  # (B, T-1)
    logprobs = empty.masked_scatter(keep, torch.cat(picked)) if picked else empty
    logprobs = F.pad(logprobs, (1, 0))  # (B, T), aligned with input_ids
    entropy = None
    if with_entropy:
        entropy = F.pad(
            empty.masked_scatter(keep, torch.cat(entropies).detach()) if entropies else empty, (1, 0)
        )
    return logprobs, entropy


def sequence_logprobs(model: PreTrainedModel, batch: dict, temperature: float = 1.0) -> torch.Tensor:
    """Summed log-prob of each row's target tokens (labels != -100): a padded batch -> (B,)."""
    hidden = final_hidden(model, batch["input_ids"], batch["attention_mask"])
    logprobs, _ = logprobs_from_hidden(
        model, hidden, batch["input_ids"], batch["labels"] != -100, temperature
    )
    return logprobs.sum(dim=1)


def model_lm_loss_sum(
    model: PreTrainedModel, batch: dict, chunk_size: int = 1024, chunked: bool = True
) -> torch.Tensor:
    """Summed next-token loss of a padded or packed batch (`tunelab.data.packing`). `chunked`:
    logits only at target positions, in chunks (`chunked_lm_loss_sum`); else the full (B, T, V) logits."""
    attention = model.config._attn_implementation
    if not chunked:
        logits = model(**model_inputs(batch, attention), use_cache=False).logits  # (B, T, V)
        return lm_loss_sum(logits, batch["labels"])
    hidden = final_hidden_states(model, **model_inputs(batch, attention))  # (B, T, H)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    return chunked_lm_loss_sum(hidden, model.get_output_embeddings(), batch["labels"], chunk_size, softcap)

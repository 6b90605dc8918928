"""Token log-probabilities under the policy and under the frozen reference policy pi_ref.

DPO, PPO and GRPO compare the trained policy pi with the model it started from. The reference is

- for adapter methods (lora, adapter, prefix): the same model inside the method's
  `disabled(model)` context, which computes the base model's outputs (no second copy; torchtune's
  `disable_adapter`, TRL's `use_adapter(None)`);
- for full and partial fine-tuning: a frozen deep copy made before training starts.

Log-probabilities come from the final hidden states h (after the last norm) and the LM head,
computed only where they are needed and in chunks (never the whole (B, T, V) logits):

    log pi(x_t | x_<t) = log_softmax(W h_{t-1} / tau)[x_t]
    H_t = logsumexp(z) - sum_v softmax(z)_v z_v,   z = W h_{t-1} / tau         (entropy)

tau is the sampling temperature (1 outside PPO/GRPO), so that the log-probs are those of the
distribution the rollouts were sampled from. Position ids follow the attention mask
(cumsum - 1), so a left-padded prompt sees the positions it had during generation.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

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


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0 (policy, reference and rollouts then agree; as TRL does)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


class Reference:
    """The reference policy of a run: the method's `disabled` context, or a frozen copy.

    Make it before any training step (and before attaching value or reward heads).
    """

    def __init__(self, model: PreTrainedModel, method: ModuleType, frozen_copy=None):
        """`frozen_copy(model)` makes the copy (default: a frozen deep copy in eval mode); a run
        passes `run.dist.frozen_copy`, which shards the copy like the model under FSDP."""
        self.policy = model
        self.method = method
        self.copy: PreTrainedModel | None = None
        if not hasattr(method, "disabled"):
            self.copy = frozen_copy(model) if frozen_copy is not None else copy.deepcopy(model).eval()
            self.copy.requires_grad_(False)

    @property
    def kind(self) -> str:
        return (
            "frozen copy" if self.copy is not None else f"{self.method.__name__.rsplit('.', 1)[-1]} disabled"
        )

    @contextlib.contextmanager
    def model(self) -> Iterator[PreTrainedModel]:
        """A model computing pi_ref, for use under `torch.no_grad()`."""
        if self.copy is not None:
            yield self.copy
            return
        with self.method.disabled(self.policy):
            yield self.policy


@torch.no_grad()
def reference_logprobs(
    reference: Reference,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    target_mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log pi_ref(x_t | x_<t) at the target positions, 0 elsewhere: (B, T) -> (B, T)."""
    with reference.model() as ref:
        hidden = final_hidden(ref, input_ids, attention_mask)
        return logprobs_from_hidden(ref, hidden, input_ids, target_mask, temperature)[0]


@torch.no_grad()
def reference_sequence_logprobs(reference: Reference, batch: dict) -> torch.Tensor:
    """Summed reference log-prob of each row's target tokens: a padded batch -> (B,)."""
    return reference_logprobs(
        reference, batch["input_ids"], batch["attention_mask"], batch["labels"] != -100
    ).sum(dim=1)

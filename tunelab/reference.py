"""Token log-probabilities under the policy and under the frozen reference policy pi_ref.

DPO, PPO and GRPO compare the trained policy pi with the model it started from. The reference is

- for methods that switch off to the base model (`Method.DISABLES_TO_BASE`: lora, adapter, prefix):
  the same model inside the method's `disabled(model)` context, which computes the base model's
  outputs (no second copy; torchtune's `disable_adapter`, TRL's `use_adapter(None)`);
- for the others (full and partial fine-tuning), and for an earlier run's adapter that trains
  further (`model.earlier_adapter: continue`, where disabling it would give the bare base): a frozen
  deep copy made before training starts.

Either way pi_ref is the policy the run starts from: for a run that starts from an earlier run (an
SFT model, `tunelab.trained.load_start`) that is the SFT model, never the bare base.

The log-probabilities themselves are computed in `tunelab.logprobs`.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from transformers import PreTrainedModel

from tunelab.logprobs import final_hidden, logprobs_from_hidden
from tunelab.methods import Method
from tunelab.trained import StartingPoint


class Reference:
    """The reference policy of a run: the method's `disabled` context, or a frozen copy.

    Make it before any training step (and before attaching value or reward heads).
    """

    def __init__(
        self, model: PreTrainedModel, method: Method, frozen_copy=None, start: StartingPoint | None = None
    ):
        """`frozen_copy(model)` makes the copy (default: a frozen deep copy in eval mode); a run
        passes `run.dist.frozen_copy`, which shards the copy like the model under FSDP. `start` is
        where the model came from (`run.start`): it names the reference in `kind`, and an earlier
        adapter that trains further needs the copy."""
        self.policy = model
        self.method = method
        self.start = start
        self.copy: PreTrainedModel | None = None
        if not method.DISABLES_TO_BASE or (start is not None and start.continued):
            self.copy = frozen_copy(model) if frozen_copy is not None else copy.deepcopy(model).eval()
            self.copy.requires_grad_(False)

    @property
    def kind(self) -> str:
        """How pi_ref is computed, and which model it is (the log says it)."""
        how = (
            "frozen copy" if self.copy is not None else f"{self.method.__name__.rsplit('.', 1)[-1]} disabled"
        )
        return f"{how} = {self.start.describe()}" if self.start is not None else how

    @contextlib.contextmanager
    def model(self) -> Iterator[PreTrainedModel]:
        """A model computing pi_ref, for use under `torch.no_grad()`."""
        if self.copy is not None:
            yield self.copy
            return
        with self.method.disabled(self.policy) as base:
            yield base


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

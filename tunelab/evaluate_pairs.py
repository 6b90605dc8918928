"""Held-out preference pairs for `tunelab eval`: how a model ranks the chosen response over the
rejected one, and, for a DPO run, the objective's own held-out figures.

For a pair (x, c, r) and a policy pi, with log pi(y|x) the summed log-probability of y's tokens
(template EOS included, prompt excluded; `tunelab.logprobs.sequence_logprobs`):

    chosen_logp, rejected_logp = mean over pairs of log pi(c|x), log pi(r|x)
    ranking_accuracy           = mean over pairs of [log pi(c|x) > log pi(r|x)]

These need no reference and apply to any model. Of a DPO run (`objective.name: dpo`) the figures
training logs on held-out pairs follow as well, from the same log-probs and the run's loss options
(`tunelab.objectives.dpo.losses_from_logprobs`):

    eval_loss, eval_margin, eval_accuracy = mean over pairs of L, r_c - r_r, [r_c > r_r]

with the implicit rewards r = beta (log pi - log pi_ref) for `sigmoid` and `ipo`, and beta times
the per-token average log-prob for the reference-free `simpo` and `orpo`. pi_ref is the policy the
run started from (tunelab/reference.py): for lora, adapter and prefix the loaded adapter switched
off; for full and partial fine-tuning, and for an earlier adapter trained further, the run's
`model.name_or_path` loaded again. On the run's own held-out pairs these equal the run's
`eval_loss`, `eval_margin` and `eval_accuracy` (tests/recipes/test_eval_pairs.py).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from tunelab.config import RunConfig
from tunelab.data.collate import to_device
from tunelab.data.preference import PairExample, pad_pairs
from tunelab.logprobs import sequence_logprobs
from tunelab.methods import get_method
from tunelab.reference import Reference
from tunelab.trained import load_start


def dpo_reference(model: PreTrainedModel, method: str, config: RunConfig) -> Reference | None:
    """pi_ref of the DPO run `config` whose trained policy is `model` (loaded with `method`); None for
    the reference-free losses. Disabling the method gives the start unless the run trained its start's
    own adapter further (`earlier_adapter: continue`) or trained the weights themselves: then the start
    is loaded again from `model.name_or_path`, in the policy's dtype and on its device."""
    from tunelab.objectives.dpo import REFERENCE_FREE

    if config.objective.options.loss in REFERENCE_FREE:
        return None
    module = get_method(method)
    continued = config.model.earlier_adapter == "continue"
    if module.DISABLES_TO_BASE and not continued:
        return Reference(model, module)
    first = next(model.parameters())
    start, _ = load_start(
        config.model.name_or_path,
        dtype=str(first.dtype).removeprefix("torch."),
        device=first.device,
        trust_remote_code=config.model.trust_remote_code,
    )
    return Reference(model, get_method("full"), frozen_copy=lambda _: start.eval())


@torch.no_grad()
def pair_figures(
    model: PreTrainedModel,
    pairs: list[PairExample],
    pad_id: int,
    batch_size: int,
    dpo: tuple[Reference | None, object] | None = None,
) -> dict[str, float]:
    """Means over `pairs` of the reference-free figures (module docstring) and, with `dpo` =
    (pi_ref or None, the run's `dpo.Options`), of the DPO run's eval_loss, eval_margin and
    eval_accuracy; in batches of `batch_size` pairs, in eval mode."""
    from tunelab.objectives.dpo import losses_from_logprobs

    model.eval()
    device = next(model.parameters()).device
    sums: dict[str, float] = {}
    for start in range(0, len(pairs), batch_size):
        batch = to_device(pad_pairs(pairs[start : start + batch_size], pad_id), device)  # 2P rows
        policy = sequence_logprobs(model, batch).float()  # (2P,): chosen rows, then rejected
        chosen, rejected = policy.chunk(2)  # (P,) each
        figures = {"chosen_logp": chosen, "rejected_logp": rejected, "ranking_accuracy": (chosen > rejected)}
        if dpo is not None:
            losses, reward_chosen, reward_rejected = losses_from_logprobs(policy, dpo[0], dpo[1], batch)
            figures["eval_loss"] = losses
            figures["eval_margin"] = reward_chosen - reward_rejected
            figures["eval_accuracy"] = reward_chosen > reward_rejected
        for name, values in figures.items():
            sums[name] = sums.get(name, 0.0) + float(values.float().sum())
    return {name: total / max(len(pairs), 1) for name, total in sums.items()}

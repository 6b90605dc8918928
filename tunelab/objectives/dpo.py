"""Direct Preference Optimization: learn from preference pairs without a reward model or sampling.

Rafailov et al. 2023. With log pi(y|x) the summed log-probability of the completion tokens of y
(template EOS included, prompt excluded) under the policy pi and the frozen reference pi_ref:

    Delta = (log pi(c|x) - log pi_ref(c|x)) - (log pi(r|x) - log pi_ref(r|x))
    L     = - (1 / P) sum_pairs [(1 - eps) log sigma(beta Delta) + eps log sigma(-beta Delta)]

over the P pairs of an optimizer step; eps = `label_smoothing` (conservative DPO, 0 = plain DPO).
The implicit rewards beta (log pi - log pi_ref) of the chosen and rejected responses, their margin
and the pairwise accuracy are logged, and measured on held-out pairs before and after training.

The reference is the model with the method disabled (lora, adapter, prefix) or a frozen copy
(full, partial); see tunelab/reference.py. Training goes through the shared loop
(`tunelab.training.loop.optimize`, units = pairs), so gradient accumulation, checkpoints and
exact resume work as for SFT. The recipe: load pairs -> set up model, method and reference ->
evaluate -> train -> evaluate -> save `final/` (the method's artifact, as for SFT).

`loss` chooses the pairwise loss (the formulas are in tunelab/losses/):

- `sigmoid`: DPO above (losses/dpo.py);
- `ipo`: IPO (Azar et al. 2023), (h - 1/(2 beta))^2 on the per-token-averaged log-ratio margin h
  (losses/dpo.py);
- `simpo`: SimPO (Meng et al. 2024), -log sigma(beta (avg(c) - avg(r)) - gamma) on the policy's
  per-token-averaged log-probs, no reference (losses/simpo.py);
- `orpo`: ORPO (Hong et al. 2024), -avg(c) - beta log sigma(log odds ratio), no reference
  (losses/orpo.py).

The reference-free losses (`simpo`, `orpo`) build no reference policy and run no reference
forward. KTO, which learns from unpaired examples, is its own objective (tunelab/objectives/kto.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch

from tunelab.config import RunConfig
from tunelab.logprobs import sequence_logprobs
from tunelab.losses.dpo import dpo_loss, ipo_loss
from tunelab.losses.orpo import orpo_loss
from tunelab.losses.simpo import simpo_loss
from tunelab.models import disable_dropout
from tunelab.objectives.pairs import held_out_pair_figures, pair_batches, read_pairs, report_pairs
from tunelab.reference import Reference, reference_sequence_logprobs
from tunelab.trained import start_tokenizer
from tunelab.training.loop import StepLoop, accumulated_step, resume, total_steps
from tunelab.training.optim import build_optimizer
from tunelab.training.setup import before_and_after, save_final, setup_run, write_summary

REFERENCE_FREE = ("simpo", "orpo")
"""Losses computed from the policy alone: no reference policy is built for them."""


@dataclass
class Options:
    loss: Literal["sigmoid", "ipo", "simpo", "orpo"] = "sigmoid"
    """The pairwise loss: `sigmoid` (DPO, Rafailov et al. 2023), `ipo` (Azar et al. 2023), `simpo`
    (Meng et al. 2024, reference-free), `orpo` (Hong et al. 2024, reference-free, SFT included).
    KTO, on unpaired examples, is `objective.name: kto`."""
    beta: float = 0.1
    """sigmoid: how strongly the policy is held near the reference (higher = closer), 0.1 is usual;
    ipo: the regularisation tau (target margin 1/(2 beta)); simpo: the reward scale (the paper uses
    2 to 2.5); orpo: lambda, the weight of the odds-ratio term (the paper uses 0.1 to 0.5)."""
    label_smoothing: float = 0.0
    """eps of conservative DPO: the assumed probability that a preference label is flipped (0 to
    0.5); for `sigmoid` and `simpo` only."""
    simpo_gamma: float = 0.5
    """simpo: the target reward margin gamma between chosen and rejected responses (TRL's name)."""
    cpo_alpha: float = 0.0
    """simpo: weight of the chosen response's per-token NLL added to the loss (CPO-SimPO; TRL's
    name); 0 is the paper's SimPO."""

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"beta must be positive, not {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), not {self.label_smoothing}")
        if self.label_smoothing and self.loss not in ("sigmoid", "simpo"):
            raise ValueError(f"label_smoothing applies to loss sigmoid or simpo, not {self.loss}")
        if self.cpo_alpha < 0:
            raise ValueError(f"cpo_alpha must be >= 0, not {self.cpo_alpha}")
        if self.cpo_alpha and self.loss != "simpo":
            raise ValueError(f"cpo_alpha applies to loss simpo, not {self.loss}")


def run(config: RunConfig) -> dict:
    """Train a policy with DPO; returns the summary written to `summary.json`."""
    # Set-up: the policy with its method, the pairs, the reference policy, the optimizer.
    cfg, options = config.train, config.objective.options
    tokenizer = start_tokenizer(config)
    data = read_pairs(config, tokenizer)  # every pair checked before the model loads
    run = setup_run(config, tokenizer)
    model = run.model
    report_pairs(run, data)
    disable_dropout(model)
    reference = None  # simpo and orpo: no reference policy at all
    if options.loss not in REFERENCE_FREE:
        reference = Reference(model, run.method, run.dist.frozen_copy, run.start)
    kind = reference.kind if reference else f"none ({options.loss} is reference-free)"
    run.print(f"[tunelab] loss: {options.loss}; reference policy: {kind}")
    figures = partial(dpo_figures, model, reference, options)
    evaluate = partial(held_out_pair_figures, run, data.eval, figures) if data.eval else None
    # DDP or FSDP2 under torchrun (the reference copy is made and sharded first; under FSDP each
    # rank reads its shard of the weights here, so the held-out figures come after it).
    run.dist.wrap(model)
    before = evaluate() if evaluate else {}
    steps = total_steps(run, -(-len(data.train) // run.global_batch))
    optimizer = build_optimizer(model, cfg)
    start = resume(run, optimizer)
    batches = pair_batches(run, data.train, position=start * cfg.grad_accum)

    # The loop: one optimizer step per `grad_accum` micro-batches of pairs.
    loop = StepLoop(run, optimizer, steps, start, evaluate)
    with loop.running():
        for step in loop.step_numbers():
            micro_batches = [next(batches) for _ in range(cfg.grad_accum)]
            loss_fn = partial(dpo_loss_sum, model, reference, options)
            loop.end_step(
                step, accumulated_step(run, optimizer, micro_batches, loss_fn), step * cfg.grad_accum
            )

    # The end: `final/` first, then the held-out figures and `summary.json`.
    final = save_final(run)
    summary = {"steps": steps, "final_train_loss": loop.result().final_loss}
    if evaluate:
        summary.update(before_and_after(before, evaluate()))
    return write_summary(run, summary, final)


def average_logprobs(model, batch: dict) -> torch.Tensor:
    """Log-prob of each row's target tokens averaged over them (SimPO's and ORPO's avg(y)): (B,)."""
    return per_target(sequence_logprobs(model, batch), batch)


def per_target(summed: torch.Tensor, batch: dict) -> torch.Tensor:
    """Each row's summed log-prob (B,) divided by its target tokens: avg(y), (B,)."""
    return summed / target_counts(batch)


def target_counts(batch: dict) -> torch.Tensor:
    """Target (completion) tokens of each row, at least 1: (B,)."""
    return (batch["labels"][:, 1:] != -100).sum(dim=1).clamp(min=1)


def pair_losses(model, reference: Reference | None, options: Options, batch: dict):
    """Per-pair losses and implicit rewards of a batch of pairs (chosen rows first, then rejected),
    for `options.loss`: (losses (P,), reward of chosen (P,), of rejected (P,)). The rewards are
    beta log-ratios (sigmoid, ipo) or beta times the averaged log-probs (simpo, orpo)."""
    return losses_from_logprobs(sequence_logprobs(model, batch), reference, options, batch)


def losses_from_logprobs(policy: torch.Tensor, reference: Reference | None, options: Options, batch: dict):
    """`pair_losses` from the policy's summed log-probs of the batch's rows, `policy` (2P,), chosen
    first: every loss is a function of them (and, for sigmoid and ipo, of the reference's)."""
    if options.loss in ("simpo", "orpo"):
        chosen, rejected = per_target(policy, batch).chunk(2)  # avg(y): (P,) each
        if options.loss == "orpo":
            return orpo_loss(chosen, rejected, options.beta)[:3]
        return simpo_loss(
            chosen, rejected, options.beta, options.simpo_gamma, options.label_smoothing, options.cpo_alpha
        )
    policy_chosen, policy_rejected = policy.chunk(2)
    ref_chosen, ref_rejected = reference_sequence_logprobs(reference, batch).chunk(2)
    if options.loss == "ipo":
        chosen_lengths, rejected_lengths = target_counts(batch).chunk(2)
        return ipo_loss(
            policy_chosen,
            policy_rejected,
            ref_chosen,
            ref_rejected,
            chosen_lengths,
            rejected_lengths,
            options.beta,
        )
    return dpo_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, options.beta, options.label_smoothing
    )


def dpo_loss_sum(
    model, reference: Reference | None, options: Options, batch: dict
) -> tuple[torch.Tensor, dict]:
    """The pairwise loss summed over a micro-batch's pairs, and the implicit-reward figures summed too."""
    losses, chosen, rejected = pair_losses(model, reference, options, batch)  # (P,) each
    extras = {
        "reward_chosen": chosen.sum(),
        "reward_rejected": rejected.sum(),
        "reward_margin": (chosen - rejected).sum(),
        "reward_accuracy": (chosen > rejected).float().sum(),
    }
    return losses.sum(), extras


def dpo_figures(model, reference: Reference | None, options: Options, batch: dict) -> dict[str, torch.Tensor]:
    """Per-pair held-out figures: the loss, implicit reward margin, pairwise accuracy (each (P,))."""
    losses, chosen, rejected = pair_losses(model, reference, options, batch)
    return {"loss": losses, "margin": chosen - rejected, "accuracy": (chosen > rejected).float()}

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
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from tunelab.config import RunConfig
from tunelab.logprobs import sequence_logprobs
from tunelab.losses.dpo import dpo_loss
from tunelab.models import disable_dropout, load_tokenizer
from tunelab.objectives.pairs import held_out_pair_figures, pair_batches, read_pairs, report_pairs
from tunelab.reference import Reference, reference_sequence_logprobs
from tunelab.training.loop import StepLoop, accumulated_step, resume, total_steps
from tunelab.training.optim import build_optimizer
from tunelab.training.setup import before_and_after, save_final, setup_run, write_summary


@dataclass
class Options:
    beta: float = 0.1
    """beta: how strongly the policy is held near the reference (higher = closer); 0.1 is usual."""
    label_smoothing: float = 0.0
    """eps of conservative DPO: the assumed probability that a preference label is flipped (0 to 0.5)."""

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"beta must be positive, not {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), not {self.label_smoothing}")


def run(config: RunConfig) -> dict:
    """Train a policy with DPO; returns the summary written to `summary.json`."""
    # Set-up: the policy with its method, the pairs, the reference policy, the optimizer.
    cfg, options = config.train, config.objective.options
    tokenizer = load_tokenizer(config.model.name_or_path, config.model.trust_remote_code)
    data = read_pairs(config, tokenizer)  # every pair checked before the model loads
    run = setup_run(config, tokenizer)
    model = run.model
    report_pairs(run, data)
    disable_dropout(model)
    reference = Reference(model, run.method, run.dist.frozen_copy)
    run.print(f"[tunelab] reference policy: {reference.kind}")
    figures = partial(dpo_figures, model, reference, options)
    evaluate = partial(held_out_pair_figures, run, data.eval, figures) if data.eval else None
    before = evaluate() if evaluate else {}
    steps = total_steps(run, -(-len(data.train) // run.global_batch))
    run.dist.wrap(model)  # DDP or FSDP2 under torchrun (the reference copy is made and sharded first)
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


def pair_losses(model, reference: Reference, options: Options, batch: dict):
    """Per-pair DPO losses and implicit rewards of a batch of pairs (chosen rows first, then
    rejected): (losses (P,), beta log-ratio of chosen (P,), of rejected (P,))."""
    policy_chosen, policy_rejected = sequence_logprobs(model, batch).chunk(2)
    ref_chosen, ref_rejected = reference_sequence_logprobs(reference, batch).chunk(2)
    return dpo_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, options.beta, options.label_smoothing
    )


def dpo_loss_sum(model, reference: Reference, options: Options, batch: dict) -> tuple[torch.Tensor, dict]:
    """The DPO loss summed over a micro-batch's pairs, and the implicit-reward figures summed too."""
    losses, chosen, rejected = pair_losses(model, reference, options, batch)  # (P,) each
    extras = {
        "reward_chosen": chosen.sum(),
        "reward_rejected": rejected.sum(),
        "reward_margin": (chosen - rejected).sum(),
        "reward_accuracy": (chosen > rejected).float().sum(),
    }
    return losses.sum(), extras


def dpo_figures(model, reference: Reference, options: Options, batch: dict) -> dict[str, torch.Tensor]:
    """Per-pair held-out figures: DPO loss, implicit reward margin, pairwise accuracy (each (P,))."""
    losses, chosen, rejected = pair_losses(model, reference, options, batch)
    return {"loss": losses, "margin": chosen - rejected, "accuracy": (chosen > rejected).float()}

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

import torch

from tunelab.config import RunConfig
from tunelab.data.preference import prepare_preferences
from tunelab.logprobs import sequence_logprobs
from tunelab.losses.dpo import dpo_loss
from tunelab.models import disable_dropout
from tunelab.objectives.pairs import held_out_pair_batches, pair_batches, pair_count, real_tokens
from tunelab.reference import Reference, reference_sequence_logprobs
from tunelab.training.loop import optimize, total_steps
from tunelab.training.setup import report_data, save_final, setup_run, write_summary


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
    cfg, options = config, config.objective.options
    run_ = setup_run(cfg)
    tokenizer, model = run_.tokenizer, run_.model
    data = prepare_preferences(cfg.data, tokenizer, seed=cfg.train.seed)
    eval_count = len(data.eval) if data.eval else 0
    report_data(run_, len(data.train), eval_count, "pairs", f"template {data.template}", data.notes)
    disable_dropout(model)
    reference = Reference(model, run_.method, run_.dist.frozen_copy)
    run_.print(f"[tunelab] reference policy: {reference.kind}")
    pad_id = tokenizer.pad_token_id

    def pair_losses(batch):
        """Per-pair DPO losses and implicit rewards of a batch (chosen rows first, then rejected)."""
        policy_chosen, policy_rejected = sequence_logprobs(model, batch).chunk(2)
        ref_chosen, ref_rejected = reference_sequence_logprobs(reference, batch).chunk(2)
        return dpo_loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, options.beta, options.label_smoothing
        )

    def loss_fn(batch):
        losses, chosen, rejected = pair_losses(batch)  # (B,) each
        extras = {
            "reward_chosen": chosen.sum(),
            "reward_rejected": rejected.sum(),
            "reward_margin": (chosen - rejected).sum(),
            "reward_accuracy": (chosen > rejected).float().sum(),
        }
        return losses.sum(), extras

    @torch.no_grad()
    def evaluate() -> dict:
        """Held-out DPO loss, implicit reward margin and pairwise accuracy."""
        was_training = model.training
        model.eval()
        loss = margin = accuracy = 0.0
        count = 0
        for batch in held_out_pair_batches(run_, data.eval, pad_id):
            with run_.autocast():
                losses, chosen, rejected = pair_losses(batch)
            loss += float(losses.sum())
            margin += float((chosen - rejected).sum())
            accuracy += float((chosen > rejected).float().sum())
            count += len(losses)
        model.train(was_training)
        count = max(count, 1)
        return {"eval_loss": loss / count, "eval_margin": margin / count, "eval_accuracy": accuracy / count}

    before = evaluate() if data.eval else {}
    steps = total_steps(run_, -(-len(data.train) // run_.global_batch))

    def make_batches(position: int):
        return pair_batches(run_, data.train, pad_id, position)

    result = optimize(
        run_, make_batches, loss_fn, pair_count, steps, evaluate if data.eval else None, real_tokens
    )

    summary = {"steps": result.steps, "final_train_loss": result.final_loss}
    if data.eval:
        summary.update({f"{k}_before": v for k, v in before.items()})
        summary.update(evaluate())
    reference.copy = None  # free the frozen copy before saving
    final = save_final(run_)
    summary["final_dir"] = str(final)
    return write_summary(run_, summary)

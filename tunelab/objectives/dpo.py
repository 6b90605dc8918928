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

import json
from dataclasses import dataclass

import torch

from tunelab.config import RunConfig
from tunelab.data.collate import batch_stream
from tunelab.data.preference import pad_pairs, prepare_preferences
from tunelab.losses.dpo import dpo_loss
from tunelab.reference import Reference, disable_dropout, reference_sequence_logprobs, sequence_logprobs
from tunelab.training.loop import optimize, total_steps
from tunelab.training.setup import save_final, setup_run


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
    run_.print(
        f"[tunelab] data: {len(data.train)} train / {len(data.eval) if data.eval else 0} eval pairs, "
        f"template {data.template}"
    )
    for note in data.notes:
        run_.print(f"[tunelab] data: {note}")
    disable_dropout(model)
    reference = Reference(model, run_.method, run_.dist.frozen_copy)
    run_.print(f"[tunelab] reference policy: {reference.kind}")
    pad_id = tokenizer.pad_token_id

    def to_device(batch):
        return {k: v.to(run_.device) for k, v in batch.items()}

    # Global batches of batch_size x ranks; each rank takes its rows (tunelab.training.distributed).
    global_batch = cfg.train.batch_size * run_.dist.world_size

    def make_batches(position: int):
        lengths = [p.length for p in data.train]
        for indices in batch_stream(
            lengths, global_batch, cfg.train.seed, position, cfg.data.group_by_length
        ):
            yield to_device(pad_pairs([data.train[i] for i in run_.dist.shard(indices)], pad_id))

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

    def units(batch):
        return len(batch["margin"])

    def real_tokens(batch):
        return int(batch["attention_mask"].sum())

    @torch.no_grad()
    def evaluate() -> dict:
        """Held-out DPO loss, implicit reward margin and pairwise accuracy."""
        was_training = model.training
        model.eval()
        loss = margin = accuracy = 0.0
        count, size = 0, cfg.train.batch_size
        for start in list(range(0, len(data.eval), size))[: cfg.train.eval_batches]:
            batch = to_device(pad_pairs(data.eval[start : start + size], pad_id))
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
    steps = total_steps(run_, -(-len(data.train) // global_batch))
    result = optimize(run_, make_batches, loss_fn, units, steps, evaluate if data.eval else None, real_tokens)

    summary = {"steps": result.steps, "final_train_loss": result.final_loss}
    if data.eval:
        summary.update({f"{k}_before": v for k, v in before.items()})
        summary.update(evaluate())
    reference.copy = None  # free the frozen copy before saving
    final = save_final(run_)
    summary["final_dir"] = str(final)
    if run_.is_main:
        (run_.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        run_.print(
            "[tunelab] "
            + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items())
        )
    return summary

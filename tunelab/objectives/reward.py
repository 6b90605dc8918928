"""Reward model: a scalar head on a causal LM, trained on preference pairs (Bradley-Terry).

Ouyang et al. 2022 ("Training language models to follow instructions with human feedback"):
for a prompt x with a chosen response c and a rejected one r,

    r_theta(x, y) = w^T h_last(x, y) + b          (h_last: final hidden state of the last token)
    L = - (1 / P) sum_pairs log sigma(r_theta(x, c) - r_theta(x, r) - m)   [+ c (r_c + r_r)^2]

over the P pairs of an optimizer step, with an optional per-pair margin m (a `margin` field in the
data) and centring coefficient c. The head trains in full whatever the method (with LoRA, the
adapter and the head train). Held-out pairwise accuracy (how often r_c > r_r) is the measure.

The recipe: load pairs -> set up model and method -> attach the head -> evaluate -> train ->
evaluate -> save `final/` (the method's artifact + `reward_head.safetensors` + `reward_model.json`,
see tunelab/rl/reward_model.py), which PPO (`objective.reward_model`) and `tunelab score` load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tunelab.config import RunConfig
from tunelab.data.preference import PairExample, prepare_preferences
from tunelab.losses.reward import bradley_terry_loss, pairwise_accuracy
from tunelab.objectives.pairs import held_out_pair_batches, pair_batches, pair_count, real_tokens
from tunelab.rl.reward_model import REWARD_HEAD, attach_head, detach_head, save_reward_head, sequence_rewards
from tunelab.training.loop import optimize, total_steps
from tunelab.training.setup import report_data, save_final, setup_run, write_summary


@dataclass
class Options:
    center_coefficient: float | None = None
    """Add c * (r_chosen + r_rejected)^2 per pair to keep rewards centred on 0 (TRL's
    `center_rewards_coefficient`; 0.01 is typical). Unset: no centring."""

    def __post_init__(self):
        if self.center_coefficient is not None and self.center_coefficient < 0:
            raise ValueError(f"center_coefficient must be >= 0, not {self.center_coefficient}")


def run(config: RunConfig) -> dict:
    """Train a reward model; returns the summary written to `summary.json`."""
    cfg, options = config, config.objective.options
    run_ = setup_run(cfg)
    tokenizer, model = run_.tokenizer, run_.model
    data = prepare_preferences(cfg.data, tokenizer, seed=cfg.train.seed)
    eval_count = len(data.eval) if data.eval else 0
    report_data(run_, len(data.train), eval_count, "pairs", f"template {data.template}", data.notes)
    head = attach_head(model, REWARD_HEAD)
    center = options.center_coefficient or 0.0
    if not center:  # b cancels in r_c - r_r: its gradient is exactly 0, Adam would move it on rounding noise
        head.bias.requires_grad_(False)
    # The score comes from the hidden states: the LM head (and a LoRA on it) gets no gradient.
    run_.dist.find_unused_parameters = True
    pad_id = tokenizer.pad_token_id

    def rewards(batch):
        """(r_chosen (B,), r_rejected (B,)) of a batch of pairs."""
        return sequence_rewards(model, head, batch["input_ids"], batch["attention_mask"]).chunk(2)

    def loss_fn(batch):
        chosen, rejected = rewards(batch)
        losses = bradley_terry_loss(chosen, rejected, batch["margin"], center)  # (B,)
        extras = {
            "accuracy": pairwise_accuracy(chosen, rejected).sum(),
            "margin": (chosen - rejected).detach().sum(),
            "reward_chosen": chosen.detach().sum(),
            "reward_rejected": rejected.detach().sum(),
        }
        return losses.sum(), extras

    @torch.no_grad()
    def evaluate(pairs: list[PairExample] | None = None) -> dict:
        """Held-out Bradley-Terry loss, pairwise accuracy and mean reward margin."""
        pairs = pairs if pairs is not None else data.eval
        was_training = model.training
        model.eval()
        loss = accuracy = margin = 0.0
        count = 0
        for batch in held_out_pair_batches(run_, pairs, pad_id):
            with run_.autocast():
                chosen, rejected = rewards(batch)
            chosen, rejected = chosen.float(), rejected.float()
            loss += float(bradley_terry_loss(chosen, rejected, batch["margin"], center).sum())
            accuracy += float(pairwise_accuracy(chosen, rejected).sum())
            margin += float((chosen - rejected).sum())
            count += len(chosen)
        model.train(was_training)
        count = max(count, 1)
        return {"eval_loss": loss / count, "eval_accuracy": accuracy / count, "eval_margin": margin / count}

    before = evaluate() if data.eval else {}
    if before:
        run_.print(f"[tunelab] before training: eval_accuracy={before['eval_accuracy']:.4f}")
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
    head_state = run_.dist.full_state_dict(head)  # every rank (FSDP gathers); the tensors on rank 0
    detach_head(model, REWARD_HEAD)
    final = save_final(run_)
    if run_.is_main:
        saved = torch.nn.Linear(head.in_features, 1)
        saved.load_state_dict(head_state)
        save_reward_head(final, saved, data.template, cfg.method.name, cfg.model.name_or_path)
    summary["final_dir"] = str(final)
    return write_summary(run_, summary)

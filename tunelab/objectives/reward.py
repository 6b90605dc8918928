"""Reward model: a scalar head on a causal LM, trained on preference pairs (Bradley-Terry).

Ouyang et al. 2022 ("Training language models to follow instructions with human feedback"):
for a prompt x with a chosen response c and a rejected one r,

    r_theta(x, y) = w^T h_last(x, y)              (h_last: final hidden state of the last token)
    L = - (1 / P) sum_pairs log sigma(r_theta(x, c) - r_theta(x, r) - m)   [+ c (r_c + r_r)^2]

over the P pairs of an optimizer step, with an optional per-pair margin m (a `margin` field in the
data) and centring coefficient c. The head trains in full whatever the method (with LoRA, the
adapter and the head train). The head has no bias: a constant cancels in r_c - r_r, and the
sequence-classification `score` layer it is saved as has none. The last token is the last one that
is not padding, as `XForSequenceClassification` pools. Held-out pairwise accuracy (how often
r_c > r_r) is the measure.

The recipe: load pairs -> set up model and method -> attach the head -> evaluate -> train ->
evaluate -> save `final/`: a one-label `XForSequenceClassification` (full, partial) or its PEFT
SEQ_CLS adapter (LoRA) that transformers, PEFT and TRL load, else the method's artifact with
`reward_head.safetensors`; `reward_model.json` beside it either way (tunelab/rl/reward_model.py).
PPO, GRPO (`objective.reward_model`) and `tunelab score` load it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from tunelab.config import RunConfig
from tunelab.losses.reward import bradley_terry_loss, pairwise_accuracy
from tunelab.objectives.pairs import held_out_pair_figures, pair_batches, read_pairs, report_pairs
from tunelab.rl.reward_model import (
    CLASSIFIER_METHODS,
    NOT_PAD,
    REWARD_HEAD,
    add_score_to_adapter,
    as_classifier,
    attach_head,
    detach_head,
    save_reward_head,
    sequence_rewards,
    write_reward_info,
)
from tunelab.trained import start_tokenizer
from tunelab.training.loop import StepLoop, accumulated_step, resume, total_steps
from tunelab.training.optim import build_optimizer
from tunelab.training.setup import Run, before_and_after, save_final, setup_run, write_summary


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
    # Set-up: the model with its method and a scalar head, the pairs, the optimizer.
    cfg, options = config.train, config.objective.options
    tokenizer = start_tokenizer(config)
    data = read_pairs(config, tokenizer)  # every pair checked before the model loads
    run = setup_run(config, tokenizer)
    report_pairs(run, data)
    head = attach_head(run.model, REWARD_HEAD, bias=False)
    center, pad = options.center_coefficient or 0.0, tokenizer.pad_token_id
    # The score comes from the hidden states: the LM head (and a LoRA on it) gets no gradient.
    run.dist.find_unused_parameters = True
    figures = partial(reward_figures, run.model, head, pad, center)
    evaluate = partial(held_out_pair_figures, run, data.eval, figures) if data.eval else None
    # DDP or FSDP2 under torchrun (the head is attached first; under FSDP each rank reads its shard
    # of the weights here, so the held-out figures come after it).
    run.dist.wrap(run.model)
    before = evaluate() if evaluate else {}
    if before:
        run.print(f"[tunelab] before training: eval_accuracy={before['eval_accuracy']:.4f}")
    steps = total_steps(run, -(-len(data.train) // run.global_batch))
    optimizer = build_optimizer(run.model, cfg)
    start = resume(run, optimizer)
    batches = pair_batches(run, data.train, position=start * cfg.grad_accum)

    # The loop: one optimizer step per `grad_accum` micro-batches of pairs.
    loop = StepLoop(run, optimizer, steps, start, evaluate)
    with loop.running():
        for step in loop.step_numbers():
            micro_batches = [next(batches) for _ in range(cfg.grad_accum)]
            loss_fn = partial(reward_loss_sum, run.model, head, pad, center)
            loop.end_step(
                step, accumulated_step(run, optimizer, micro_batches, loss_fn), step * cfg.grad_accum
            )

    # The end: `final/` with the head beside the method's artifact first, then the held-out figures
    # and `summary.json`.
    final = save_with_head(run, head, data.template)
    summary = {"steps": steps, "final_train_loss": loop.result().final_loss}
    if evaluate:
        summary.update(before_and_after(before, evaluate()))
    return write_summary(run, summary, final)


def rewards(model, head: nn.Linear, pad_token_id: int, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen (P,), r_rejected (P,)) of a batch of pairs (chosen rows first, then rejected)."""
    return sequence_rewards(model, head, batch["input_ids"], batch["attention_mask"], pad_token_id).chunk(2)


def reward_loss_sum(
    model, head: nn.Linear, pad_token_id: int, center: float, batch: dict
) -> tuple[torch.Tensor, dict]:
    """The Bradley-Terry loss summed over a micro-batch's pairs, and its figures summed too."""
    chosen, rejected = rewards(model, head, pad_token_id, batch)
    losses = bradley_terry_loss(chosen, rejected, batch["margin"], center)  # (P,)
    extras = {
        "accuracy": pairwise_accuracy(chosen, rejected).sum(),
        "margin": (chosen - rejected).detach().sum(),
        "reward_chosen": chosen.detach().sum(),
        "reward_rejected": rejected.detach().sum(),
    }
    return losses.sum(), extras


def reward_figures(
    model, head: nn.Linear, pad_token_id: int, center: float, batch: dict
) -> dict[str, torch.Tensor]:
    """Per-pair held-out figures: Bradley-Terry loss, pairwise accuracy, reward margin (each (P,))."""
    chosen, rejected = (r.float() for r in rewards(model, head, pad_token_id, batch))
    return {
        "loss": bradley_terry_loss(chosen, rejected, batch["margin"], center),
        "accuracy": pairwise_accuracy(chosen, rejected),
        "margin": chosen - rejected,
    }


def save_with_head(run: Run, head: nn.Linear, template: str) -> Path:
    """Save `final/` as a sequence classifier where the method allows (`CLASSIFIER_METHODS`), else
    the method's artifact with the head beside it; `reward_model.json` either way. Returns its path.
    The head is taken off the model while the method saves it (a full model's files must not hold
    it as such) and put back for the held-out evaluation. Every rank calls it (FSDP gathers the
    head); rank 0 writes."""
    head_state = run.dist.full_state_dict(head)  # the tensors on rank 0
    saved = nn.Linear(head.in_features, 1, bias=False)
    if run.is_main:
        saved.load_state_dict(head_state)
    method, base = run.config.method.name, run.config.model.name_or_path
    classifier = method in CLASSIFIER_METHODS
    view = partial(as_classifier, head=saved, pad_token_id=run.tokenizer.pad_token_id) if classifier else None
    detach_head(run.model, REWARD_HEAD)
    final = save_final(run, view)
    run.model.add_module(REWARD_HEAD, head)
    if run.is_main and classifier:
        if method == "lora":
            add_score_to_adapter(final, saved)
        write_reward_info(final, head.in_features, template, method, base, pooling=NOT_PAD)
    elif run.is_main:
        save_reward_head(final, saved, template, method, base)
    return final

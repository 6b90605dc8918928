"""KTO: learn from unpaired examples labelled desirable or undesirable (Ethayarajh et al. 2024).

Where DPO needs a chosen and a rejected response to the same prompt, KTO needs only single
completions with a thumbs-up or thumbs-down (`tunelab/data/unpaired.py`: `prompt`, `completion`,
`label`). With r(x, y) = log pi(y|x) - log pi_ref(y|x) the summed completion log-ratio and z0 the
reference point (tunelab/losses/kto.py):

    desirable:    L = lambda_D (1 - sigma(beta (r(x, y) - z0)))
    undesirable:  L = lambda_U (1 - sigma(beta (z0 - r(x, y))))

averaged over the examples of an optimizer step. z0 = max(0, mean_j r(x_j, y'_j)) estimates
KL(pi || pi_ref) on mismatched rows: each example's prompt followed by the completion of the
example before it in the step (cyclically), as TRL pairs them within a batch. It is computed once
per step, before the step's forward and backward passes, over all its micro-batches and processes
(without gradients), so that batch 8 x accumulation 1 takes the same step as 2 x 4. TRL estimates
it per micro-batch; for one micro-batch per step the two agree.

KTO is its own objective rather than a `loss` of `dpo` because its data, its batches (examples and
their mismatched rows, not pairs) and its per-step reference point all differ from DPO's; what it
shares with DPO (the reference policy, log-probs, the loop's parts) it imports.

The reference is the model with the method disabled (lora, adapter, prefix) or a frozen copy
(full, partial), as for DPO. The implicit rewards beta r(x, y) of desirable and undesirable
completions, their difference (the margin) and z0 are logged, and measured on held-out examples
before and after training.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch

from tunelab.config import RunConfig
from tunelab.data.collate import batch_stream, to_device
from tunelab.data.unpaired import (
    UnpairedData,
    UnpairedExample,
    mismatched_partners,
    pad_unpaired,
    prepare_unpaired,
)
from tunelab.logprobs import sequence_logprobs
from tunelab.losses.kto import kto_loss, kto_reference_point
from tunelab.models import disable_dropout
from tunelab.reference import Reference, reference_sequence_logprobs
from tunelab.trained import start_tokenizer
from tunelab.training.loop import MicroBatch, StepLoop, accumulated_step, resume, total_steps
from tunelab.training.optim import build_optimizer
from tunelab.training.setup import Run, before_and_after, report_data, save_final, setup_run, write_summary


@dataclass
class Options:
    beta: float = 0.1
    """beta: how strongly the policy is held near the reference (higher = closer); 0.1 is usual."""
    desirable_weight: float = 1.0
    """lambda_D, the weight of desirable examples' losses. The paper advises
    lambda_D n_D / (lambda_U n_U) between 1 and 4/3 (n: the counts of each label)."""
    undesirable_weight: float = 1.0
    """lambda_U, the weight of undesirable examples' losses."""

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"beta must be positive, not {self.beta}")
        if self.desirable_weight <= 0 or self.undesirable_weight <= 0:
            raise ValueError("desirable_weight and undesirable_weight must be positive")


def run(config: RunConfig) -> dict:
    """Train a policy with KTO; returns the summary written to `summary.json`."""
    # Set-up: the examples, the policy with its method, the reference policy, the optimizer.
    cfg, options = config.train, config.objective.options
    tokenizer = start_tokenizer(config)
    data = prepare_unpaired(config.data, tokenizer, seed=cfg.seed)  # every record checked first
    run = setup_run(config, tokenizer)
    model = run.model
    report_examples(run, data, options)
    disable_dropout(model)
    reference = Reference(model, run.method, run.dist.frozen_copy, run.start)
    run.print(f"[tunelab] reference policy: {reference.kind}")
    evaluate = partial(held_out_figures, run, data.eval, reference, options) if data.eval else None
    # DDP or FSDP2 under torchrun (the reference copy is made and sharded first; under FSDP each
    # rank reads its shard of the weights here, so the held-out figures come after it).
    run.dist.wrap(model)
    before = evaluate() if evaluate else {}
    steps = total_steps(run, -(-len(data.train) // run.global_batch))
    optimizer = build_optimizer(model, cfg)
    start = resume(run, optimizer)
    step_batches = kto_steps(run, data.train, position=start * cfg.grad_accum)

    # The loop: z0 over the step's mismatched rows, then `grad_accum` micro-batches of examples.
    loop = StepLoop(run, optimizer, steps, start, evaluate)
    with loop.running():
        for step in loop.step_numbers():
            micro_batches = next(step_batches)
            z0 = reference_point(run, model, reference, [b.tensors for b in micro_batches])
            loss_fn = partial(kto_loss_sum, model, reference, options, z0)
            figures = per_label(accumulated_step(run, optimizer, micro_batches, loss_fn))
            loop.end_step(step, {**figures, "kl": float(z0)}, step * cfg.grad_accum)

    # The end: `final/` first, then the held-out figures and `summary.json`.
    final = save_final(run)
    summary = {"steps": steps, "final_train_loss": loop.result().final_loss}
    if evaluate:
        summary.update(before_and_after(before, evaluate()))
    return write_summary(run, summary, final)


def report_examples(run: Run, data: UnpairedData, options: Options) -> None:
    """Say what the run reads, how many examples of each label, and whether the weights balance
    them as the KTO paper advises."""
    eval_count = len(data.eval) if data.eval else 0
    desirable = sum(e.desirable for e in data.train)
    undesirable = len(data.train) - desirable
    notes = [*data.notes, f"{desirable} desirable / {undesirable} undesirable training examples"]
    report_data(run, len(data.train), eval_count, "examples", f"template {data.template}", notes)
    if desirable and undesirable:
        ratio = options.desirable_weight * desirable / (options.undesirable_weight * undesirable)
        if not 1.0 <= ratio <= 4 / 3:
            run.print(
                f"[tunelab] kto: desirable_weight * {desirable} / (undesirable_weight * {undesirable}) = "
                f"{ratio:.2f}; the KTO paper advises 1 to 4/3"
            )
    if run.config.data.packing:
        run.print("[tunelab] data.packing: true is ignored by objective kto; examples are padded")


def kto_steps(run: Run, examples: list[UnpairedExample], position: int) -> Iterator[list[MicroBatch]]:
    """This process's micro-batches of the training order, a step (`train.grad_accum` of them) at a
    time, from micro-batch `position` on. Each example's mismatched row takes the completion of the
    example before it in the step's global order (cyclically), whichever process holds that one;
    units = examples, tokens = the non-padding tokens of the matched and the mismatched rows."""
    cfg = run.config
    lengths = [e.length for e in examples]
    order = batch_stream(lengths, run.global_batch, cfg.train.seed, position, cfg.data.group_by_length)
    while True:
        step = [next(order) for _ in range(cfg.train.grad_accum)]
        partners = mismatched_partners([i for indices in step for i in indices])
        micro_batches, offset = [], 0
        for indices in step:
            mine = run.dist.shard(list(zip(indices, partners[offset : offset + len(indices)], strict=True)))
            offset += len(indices)
            rows = [examples[i] for i, _ in mine]
            batch = pad_unpaired(
                rows, [examples[p] for _, p in mine], run.tokenizer.pad_token_id, cfg.data.max_length
            )
            tokens = int(batch["attention_mask"].sum() + batch["kl_attention_mask"].sum())
            micro_batches.append(
                MicroBatch(to_device(batch, run.device), len(rows), tokens, [i for i, _ in mine])
            )
        yield micro_batches


def mismatched_rows(batch: dict) -> dict:
    """The mismatched rows (x_i, y'_i) of a batch, as a padded batch of their own."""
    return {name: batch[f"kl_{name}"] for name in ("input_ids", "attention_mask", "labels")}


@torch.no_grad()
def reference_point(run: Run, model, reference: Reference, batches: list[dict]) -> torch.Tensor:
    """z0 over the mismatched rows of `batches` (a step's micro-batches) on every process:
    max(0, mean of log pi(y'_i|x_i) - log pi_ref(y'_i|x_i)), without gradients."""
    total, count = 0.0, 0
    for batch in batches:
        rows = mismatched_rows(batch)
        with run.autocast():
            logratios = sequence_logprobs(model, rows) - reference_sequence_logprobs(reference, rows)  # (B,)
        total, count = total + float(logratios.sum()), count + len(logratios)
    total, count = run.dist.sum(total, count)
    return kto_reference_point(torch.tensor(total), int(count))


def example_losses(model, reference: Reference, options: Options, z0: torch.Tensor, batch: dict):
    """Per-example KTO losses and implicit rewards beta r(x, y) of a batch: ((B,), (B,))."""
    policy = sequence_logprobs(model, batch)  # (B,)
    ref = reference_sequence_logprobs(reference, batch)  # (B,)
    return kto_loss(
        policy,
        ref,
        batch["desirable"],
        z0,
        options.beta,
        options.desirable_weight,
        options.undesirable_weight,
    )


def kto_loss_sum(
    model, reference: Reference, options: Options, z0: torch.Tensor, batch: dict
) -> tuple[torch.Tensor, dict]:
    """The KTO loss summed over a micro-batch's examples, and the reward figures summed too
    (`per_label` turns them into means per label)."""
    losses, rewards = example_losses(model, reference, options, z0, batch)
    desirable = batch["desirable"].float()  # (B,)
    extras = {
        "desirable_share": desirable.sum(),
        "reward_desirable": (rewards * desirable).sum(),
        "reward_undesirable": (rewards * (1 - desirable)).sum(),
    }
    return losses.sum(), extras


def per_label(figures: dict) -> dict:
    """A step's figures with the reward sums per example turned into means over each label's
    examples, and their difference (`reward_margin`)."""
    share = figures["desirable_share"]
    for name, part in (("reward_desirable", share), ("reward_undesirable", 1 - share)):
        if part > 0:
            figures[name] = figures[name] / part
        else:  # no example of this label in the step
            del figures[name]
    if "reward_desirable" in figures and "reward_undesirable" in figures:
        figures["reward_margin"] = figures["reward_desirable"] - figures["reward_undesirable"]
    return figures


def held_out_figures(
    run: Run, examples: list[UnpairedExample], reference: Reference, options: Options
) -> dict:
    """Held-out figures over the first `train.eval_batches` batches of `train.batch_size` examples:
    z0 over their mismatched rows (`eval_kl`), the mean loss, the mean implicit reward of desirable
    and of undesirable examples and their difference (`eval_margin`); in eval mode, under the run's
    autocast, without gradients."""
    cfg, model = run.config, run.model
    size = cfg.train.batch_size
    limit = cfg.train.eval_batches
    held_out = examples[: size * limit] if limit is not None else examples
    partners = mismatched_partners(list(range(len(held_out))))
    batches = [
        to_device(
            pad_unpaired(
                held_out[start : start + size],
                [held_out[p] for p in partners[start : start + size]],
                run.tokenizer.pad_token_id,
                cfg.data.max_length,
            ),
            run.device,
        )
        for start in range(0, len(held_out), size)
    ]
    was_training = model.training
    model.eval()
    z0 = reference_point(run, model, reference, batches)
    loss, rewards, labels = 0.0, [], []
    with torch.no_grad():
        for batch in batches:
            with run.autocast():
                losses, batch_rewards = example_losses(model, reference, options, z0, batch)
            loss += float(losses.sum())
            rewards.append(batch_rewards.float().cpu())
            labels.append(batch["desirable"].cpu())
    model.train(was_training)
    rewards_all, desirable = torch.cat(rewards), torch.cat(labels)
    figures = {"eval_loss": loss / len(held_out), "eval_kl": float(z0)}
    for label, mask in (("desirable", desirable), ("undesirable", ~desirable)):
        if mask.any():  # a held-out set may hold one label only
            figures[f"eval_reward_{label}"] = float(rewards_all[mask].mean())
    if desirable.any() and not desirable.all():
        figures["eval_margin"] = figures["eval_reward_desirable"] - figures["eval_reward_undesirable"]
    return figures

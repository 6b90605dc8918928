"""The policy updates of the online objectives: several optimizer steps on one batch of rollouts.

PPO and GRPO both take `passes` over their N rollouts, each pass in `num_mini_batches` shuffled
mini-batches (one optimizer step each), each mini-batch split into micro-batches whose losses are
divided by a normaliser of the whole mini-batch (its tokens, or its sequences), so that the step
does not depend on the split:

    g_j = grad( sum_{micro-batches c of mini-batch j} L_sum(c) / Z_j )

Z_j is global: under torchrun every rank's mini-batch j is part of global mini-batch j, so Z_j is
summed over ranks. Every backward runs through `Parallel.forward` (DDP sees the parameters the loss
touches) and DDP synchronises gradients on the last micro-batch only.
"""

from __future__ import annotations

from typing import Protocol

import torch

from tunelab.training.loop import apply_gradients
from tunelab.training.setup import Run


def split(indices: torch.Tensor, parts: int) -> list[torch.Tensor]:
    """`indices` in `parts` nearly equal, non-empty chunks."""
    return [chunk for chunk in indices.tensor_split(parts) if len(chunk)]


class RolloutBatch(Protocol):
    """One step's rollouts as an objective's loss reads them (tunelab/objectives/ppo.py, grpo.py)."""

    size: int
    """N, the rollouts of this rank."""

    def normaliser(self, rows: torch.Tensor):
        """What the losses of mini-batch `rows` (indices into the N rollouts) are divided by, summed
        over ranks."""

    def loss(self, chunk: torch.Tensor, normaliser) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss of the rows `chunk` / the mini-batch's normaliser, to back-propagate; the logged
        parts, already divided by the normaliser)."""


def policy_updates(
    run: Run,
    optimizer: torch.optim.Optimizer,
    batch: RolloutBatch,
    passes: int,
    num_mini_batches: int,
    micro_batches: int,
) -> dict[str, float]:
    """`passes` over `batch`, each in `num_mini_batches` shuffled mini-batches (one optimizer step
    each) of `micro_batches` micro-batches (see the module docstring). Returns each logged part
    summed over ranks and averaged over the updates, the mean gradient norm, and `skipped`: the
    updates not applied (a gradient that is not finite; `tunelab.training.loop.apply_gradients`)."""
    totals: dict[str, float] = {}
    grad_norm, updates, skipped = 0.0, 0, 0
    for _ in range(passes):
        for rows in split(torch.randperm(batch.size), num_mini_batches):
            normaliser = batch.normaliser(rows)
            chunks = split(rows, micro_batches)
            for index, chunk in enumerate(chunks):
                with run.dist.grad_sync(index == len(chunks) - 1):
                    with run.autocast():
                        loss, parts = run.dist.forward(batch.loss, chunk, normaliser)
                    run.backward(loss * run.dist.world_size)  # ranks average gradients: x W gives their sum
                for key, value in parts.items():
                    totals[key] = totals.get(key, 0.0) + value
            norm, applied = apply_gradients(run, optimizer)
            grad_norm, updates, skipped = grad_norm + norm, updates + 1, skipped + (not applied)
    sums = dict(zip(totals, run.dist.sum(*totals.values()), strict=True))
    return {
        **{key: value / updates for key, value in sums.items()},
        "grad_norm": grad_norm / updates,
        "skipped": skipped,
    }

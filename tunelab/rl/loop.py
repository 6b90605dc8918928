"""The outer loop of the online objectives (PPO, GRPO): one step = one batch of prompts.

Each step the objective samples rollouts for a batch of prompts, scores them and takes its own
optimizer steps on them (`step_fn`); this loop does what every step needs around that: the
learning rate of the step (tunelab/training/optim.py, scheduled over the rollout steps), metrics
(`metrics.jsonl`, one row per logged step with `step` and `loss`), periodic evaluation,
checkpoints (trainable weights, optimizer, RNG and the data position = steps done, so a resumed
run samples the same prompts and the same rollouts) and the interrupt message.

Under torchrun the model becomes data-parallel here (`Parallel.wrap`, DDP or FSDP2) before the
optimizer is built; each objective shards its prompt batches over the ranks (`Parallel.even_shard`),
samples with keys that make a rollout independent of the rank that draws it
(tunelab/rl/rollouts.py), takes global statistics with `Parallel.all_sum`, and runs every backward
pass through `Parallel.forward` (see tunelab/training/distributed.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch

from tunelab.training.loop import LoopResult, StepLoop
from tunelab.training.optim import lr_at, set_lr
from tunelab.training.setup import Run

StepFn = Callable[[int, list, torch.optim.Optimizer], dict]
"""(step, prompt batch, optimizer) -> metrics row of the step (must hold `loss`)."""


def online_loop(
    run: Run,
    make_batches: Callable[[int], Iterator[list]],
    step_fn: StepFn,
    steps: int,
    evaluate: Callable[[], dict] | None = None,
) -> LoopResult:
    """Run `steps` rollout steps; `make_batches(position)` yields prompt batches from that position
    (the data position is the number of steps done)."""
    cfg = run.config.train
    loop = StepLoop(run, steps, evaluate, "rl")
    batches = make_batches(loop.start_step)
    started = time.perf_counter()
    with loop.running():
        for step in loop.step_numbers():
            lr = lr_at(step, steps, cfg)
            set_lr(loop.optimizer, lr)
            row = {"step": step, **step_fn(step, next(batches), loop.optimizer), "lr": lr}
            row["seconds"] = time.perf_counter() - started
            postfix = {"loss": f"{row['loss']:.4f}", "reward": f"{row.get('reward', 0.0):.3f}"}
            loop.end_step(row, step, postfix)
    history = loop.history
    return LoopResult(steps, history[-1]["loss"] if history else None, history)

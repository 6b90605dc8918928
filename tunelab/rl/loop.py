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
from tqdm.auto import tqdm

from tunelab.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from tunelab.training.distributed import full_tensor
from tunelab.training.loop import LoopResult
from tunelab.training.metrics import MetricsLog, plot_loss
from tunelab.training.optim import build_optimizer, lr_at, set_lr
from tunelab.training.setup import Run

StepFn = Callable[[int, list, torch.optim.Optimizer], dict]
"""(step, prompt batch, optimizer) -> metrics row of the step (must hold `loss`)."""


def apply_gradients(run: Run, optimizer: torch.optim.Optimizer) -> float:
    """Clip the global gradient norm (`train.max_grad_norm`), step, zero; returns the norm before
    clipping (over every rank's shard under FSDP)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, run.config.train.max_grad_norm or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(full_tensor(norm))


def online_loop(
    run: Run,
    make_batches: Callable[[int], Iterator[list]],
    step_fn: StepFn,
    steps: int,
    evaluate: Callable[[], dict] | None = None,
) -> LoopResult:
    """Run `steps` rollout steps; `make_batches(position)` yields prompt batches from that position."""
    cfg = run.config.train
    model = run.model
    run.dist.wrap(model)  # DDP or FSDP2 under torchrun (before the optimizer sees the parameters)
    optimizer = build_optimizer(model, cfg)
    start_step = 0
    if cfg.resume:
        checkpoint = latest_checkpoint(run.output_dir)
        run.dist.check_same(str(checkpoint), "the latest checkpoint")
        if checkpoint is None:
            run.print(f"[tunelab] no checkpoint under {run.output_dir}/checkpoints: starting from scratch")
        else:
            start_step = load_checkpoint(checkpoint, model, optimizer)["step"]
            run.print(f"[tunelab] resumed from {checkpoint} (step {start_step})")
    metrics = MetricsLog(run.output_dir, enabled=run.is_main, resume_step=start_step)
    batches = make_batches(start_step)
    model.train()
    history: list[dict] = []
    bar = tqdm(
        total=steps,
        initial=start_step,
        disable=not (cfg.progress and run.is_main),
        desc="rl",
        dynamic_ncols=True,
    )
    started = time.perf_counter()
    try:
        for step in range(start_step + 1, steps + 1):
            lr = lr_at(step, steps, cfg)
            set_lr(optimizer, lr)
            row = {"step": step, **step_fn(step, next(batches), optimizer), "lr": lr}
            row["seconds"] = time.perf_counter() - started
            do_eval = (
                evaluate is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == steps)
            )
            if do_eval:
                row.update(evaluate())
            if step % cfg.log_every == 0 or do_eval or step == steps:
                metrics.log(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", reward=f"{row.get('reward', 0.0):.3f}")
            history.append(row)
            bar.update(1)
            if cfg.save_every and step % cfg.save_every == 0 and step != steps:
                save_checkpoint(
                    run.output_dir,
                    step,
                    model,
                    optimizer,
                    step,
                    run.config_yaml,
                    cfg.keep_last,
                    is_main=run.is_main,
                )
    except KeyboardInterrupt:
        bar.close()
        last = latest_checkpoint(run.output_dir)
        run.print(
            f"\n[tunelab] interrupted; the last checkpoint is {last or 'none'}. Continue with `train.resume=true`."
        )
        metrics.close()
        raise
    bar.close()
    metrics.close()
    if run.is_main and history:
        plot_loss(run.output_dir)
    return LoopResult(steps, history[-1]["loss"] if history else None, history)

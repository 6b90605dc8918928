"""The optimisation loop shared by the supervised objectives (sft, reward, dpo).

One optimizer step takes `grad_accum` micro-batches. Each micro-batch's loss function returns a
*sum* over its units (target tokens for sft, pairs for reward/dpo), and the step divides by the
units of all its micro-batches together:

    g = grad( sum_k L_sum(batch_k) / sum_k n_units(batch_k) )

so the step is the same whatever the split into micro-batches. Then: clip, AdamW, next lr.
In a distributed run (`tunelab.training.distributed`) the sums also run over ranks: the units are
all-reduced before the backward passes, and the logged loss and metrics are global.
Metrics are logged, evaluation and checkpoints happen on their intervals, and the data position
(micro-batches consumed) is saved so that a resumed run continues at the exact next batch.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from tunelab.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from tunelab.training.distributed import full_tensor
from tunelab.training.metrics import MetricsLog, plot_loss
from tunelab.training.optim import build_optimizer, lr_at, set_lr
from tunelab.training.setup import Run

LossFn = Callable[[dict], tuple[torch.Tensor, dict]]
"""batch -> (loss summed over the batch's units, extra metrics summed over units)"""


@dataclass
class LoopResult:
    steps: int
    final_loss: float | None
    history: list[dict] = field(default_factory=list)


def total_steps(run: Run, micro_batches_per_epoch: int) -> int:
    """`train.max_steps`, or enough steps for `train.epochs` passes over the data."""
    cfg = run.config.train
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * micro_batches_per_epoch / cfg.grad_accum))


def apply_gradients(run: Run, optimizer: torch.optim.Optimizer) -> float:
    """Clip the global gradient norm (`train.max_grad_norm`), step, zero; returns the norm before
    clipping (over every rank's shard under FSDP)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, run.config.train.max_grad_norm or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(full_tensor(norm))


class StepLoop:
    """What every training loop does around its steps (this module's `optimize`, and the online
    loop of tunelab/rl/loop.py): make the model data-parallel and build the optimizer, resume from
    the latest checkpoint, then after each step evaluate, log, update the progress bar and save a
    checkpoint on their intervals; on an interrupt, say where to resume; at the end, plot."""

    def __init__(self, run: Run, steps: int, evaluate: Callable[[], dict] | None, desc: str):
        cfg = run.config.train
        self.run, self.steps, self.evaluate = run, steps, evaluate
        run.dist.wrap(run.model)  # DDP or FSDP2 under torchrun (before the optimizer sees the parameters)
        self.optimizer = build_optimizer(run.model, cfg)
        self.start_step = 0
        if cfg.resume:
            checkpoint = latest_checkpoint(run.output_dir)
            run.dist.check_same(str(checkpoint), "the latest checkpoint")
            if checkpoint is None:
                run.print(
                    f"[tunelab] no checkpoint under {run.output_dir}/checkpoints: starting from scratch"
                )
            else:
                self.start_step = load_checkpoint(checkpoint, run.model, self.optimizer)["step"]
                run.print(f"[tunelab] resumed from {checkpoint} (step {self.start_step})")
        self.metrics = MetricsLog(run.output_dir, enabled=run.is_main, resume_step=self.start_step)
        self.history: list[dict] = []
        run.model.train()
        self.bar = tqdm(
            total=steps,
            initial=self.start_step,
            disable=not (cfg.progress and run.is_main),
            desc=desc,
            dynamic_ncols=True,
        )

    def step_numbers(self) -> range:
        """The steps still to run."""
        return range(self.start_step + 1, self.steps + 1)

    def end_step(self, row: dict, data_position: int, postfix: dict[str, str]) -> None:
        """After step `row["step"]`: evaluate (adds to `row`), log, show `postfix` on the bar, keep
        `row` in the history, and save a checkpoint holding `data_position` when it is due."""
        cfg, step, model = self.run.config.train, row["step"], self.run.model
        do_eval = (
            self.evaluate is not None
            and cfg.eval_every
            and (step % cfg.eval_every == 0 or step == self.steps)
        )
        if do_eval:
            model.eval()
            row.update(self.evaluate())
            model.train()
        if step % cfg.log_every == 0 or do_eval or step == self.steps:
            self.metrics.log(row)
            self.bar.set_postfix(**postfix)
        self.history.append(row)
        self.bar.update(1)
        if cfg.save_every and step % cfg.save_every == 0 and step != self.steps:
            save_checkpoint(
                self.run.output_dir,
                step,
                model,
                self.optimizer,
                data_position,
                self.run.config_yaml,
                cfg.keep_last,
                is_main=self.run.is_main,
            )

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Around the steps: an interrupt closes the log, names the last checkpoint and re-raises;
        a normal end closes the log and plots the loss curve."""
        try:
            yield
        except KeyboardInterrupt:
            self.bar.close()
            last = latest_checkpoint(self.run.output_dir)
            self.run.print(
                f"\n[tunelab] interrupted; the last checkpoint is {last or 'none'}. "
                "Continue with `train.resume=true`."
            )
            self.metrics.close()
            raise
        self.bar.close()
        self.metrics.close()
        if self.run.is_main and self.history:
            plot_loss(self.run.output_dir)


def optimize(
    run: Run,
    make_batches: Callable[[int], Iterator[dict]],
    loss_fn: LossFn,
    units_fn: Callable[[dict], int],
    steps: int,
    evaluate: Callable[[], dict] | None = None,
    token_count_fn: Callable[[dict], int] | None = None,
) -> LoopResult:
    """Run `steps` optimizer steps. `make_batches(position)` yields micro-batches from that position."""
    cfg = run.config.train
    loop = StepLoop(run, steps, evaluate, "train")
    position = loop.start_step * cfg.grad_accum
    batches = make_batches(position)
    tokens_seen, started = 0, time.perf_counter()
    last_loss = None
    with loop.running():
        for step in loop.step_numbers():
            lr = lr_at(step, steps, cfg)
            set_lr(loop.optimizer, lr)
            micro = [next(batches) for _ in range(cfg.grad_accum)]
            position += cfg.grad_accum
            units = sum(units_fn(b) for b in micro)
            step_tokens = sum((token_count_fn or units_fn)(b) for b in micro)
            units, step_tokens = (int(v) for v in run.dist.sum(units, step_tokens))  # over all ranks
            loss_total, extras = 0.0, {}
            for index, batch in enumerate(micro):
                with run.dist.grad_sync(index == len(micro) - 1):
                    with run.autocast():
                        loss_sum, extra = run.dist.forward(loss_fn, batch)
                    # Ranks average gradients; x world_size turns that into their sum (distributed.py).
                    (loss_sum * run.dist.world_size / max(units, 1)).backward()
                loss_total += float(loss_sum.detach())
                for key, value in extra.items():
                    extras[key] = extras.get(key, 0.0) + float(value)
            loss_total, *extra_sums = run.dist.sum(loss_total, *extras.values())
            extras = dict(zip(extras, extra_sums, strict=True))
            grad_norm = apply_gradients(run, loop.optimizer)
            last_loss = loss_total / max(units, 1)
            tokens_seen += step_tokens
            elapsed = time.perf_counter() - started
            row = {
                "step": step,
                "loss": last_loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": step_tokens,
                "tokens_per_s": tokens_seen / max(elapsed, 1e-9),
                **{k: v / max(units, 1) for k, v in extras.items()},
            }
            postfix = {"loss": f"{last_loss:.4f}", "tok_s": f"{row['tokens_per_s']:.0f}"}
            loop.end_step(row, position, postfix)
    return LoopResult(steps, last_loss, loop.history)

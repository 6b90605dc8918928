"""The parts of a training loop that every objective shares. Each recipe (tunelab/objectives/)
writes its own loop with them, so that it reads top to bottom:

    run.dist.wrap(model)                          # DDP or FSDP2 under torchrun; one process: nothing
    optimizer = build_optimizer(model, cfg.train)
    start = resume(run, optimizer)                # the latest checkpoint's step with train.resume, else 0
    loop = StepLoop(run, optimizer, steps, start, evaluate)
    with loop.running():                          # interrupt message; log closed, loss curve plotted
        for step in loop.step_numbers():          # each step still to run, its learning rate set
            row = accumulated_step(run, optimizer, micro_batches, loss_fn)   # or the objective's own step
            loop.end_step(step, row, data_position)   # evaluate, log, progress bar, checkpoint

`accumulated_step` is the step of the supervised objectives (sft, reward, dpo). It takes
`grad_accum` micro-batches; each micro-batch's loss function returns a *sum* over its units (target
tokens for sft, pairs for reward/dpo), and the step divides by the units of all its micro-batches:

    g = grad( sum_k L_sum(batch_k) / sum_k n_units(batch_k) )

so the step is the same whatever the split into micro-batches. Then: clip, AdamW, zero.
In a distributed run (`tunelab.training.distributed`) the sums also run over ranks: the units are
all-reduced before the backward passes, and the logged loss and metrics are global.
The data position (micro-batches or prompt batches consumed) is saved in each checkpoint, so that a
resumed run continues at the exact next batch.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunelab.console import progress
from tunelab.errors import Preempted, TunelabError
from tunelab.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from tunelab.training.distributed import full_tensor
from tunelab.training.metrics import MetricsLog, plot_loss, read_metrics
from tunelab.training.optim import lr_at, set_lr
from tunelab.training.setup import Run


@dataclass
class MicroBatch:
    """One micro-batch of a supervised objective, with the counts the step needs before its forward."""

    tensors: dict
    """What the loss function reads (input_ids, labels, ...), on the run's device."""
    units: int
    """What the loss is a sum over: target tokens (sft) or pairs (reward, dpo)."""
    tokens: int
    """Real (non-padding) tokens, for tokens/s."""
    examples: list[int] = field(default_factory=list)
    """Which training examples (indices into the training set) it holds, to name them when its
    step is not finite."""


LossFn = Callable[[dict], tuple[torch.Tensor, dict]]
"""A micro-batch's tensors -> (loss summed over its units, extra metrics summed over its units)."""


@dataclass
class LoopResult:
    steps: int
    final_loss: float | None
    history: list[dict] = field(default_factory=list)


def total_steps(run: Run, batches_per_epoch: int) -> int:
    """`train.max_steps`, or enough optimizer steps for `train.epochs` passes over the data, each pass
    `batches_per_epoch` micro-batches (or prompt batches) of the global batch."""
    cfg = run.config.train
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * batches_per_epoch / cfg.grad_accum))


def resume(run: Run, optimizer: torch.optim.Optimizer) -> int:
    """With `train.resume`: load the latest checkpoint into the model and `optimizer` (and the RNG
    states) and return its step; else, or without a checkpoint, 0. Call it after `run.dist.wrap`:
    under FSDP each rank keeps its shard of what it reads."""
    if not run.config.train.resume:
        return 0
    checkpoint = latest_checkpoint(run.output_dir)
    run.dist.check_same(str(checkpoint), "the latest checkpoint")
    if checkpoint is None:
        run.print(f"[tunelab] no checkpoint under {run.output_dir}/checkpoints: starting from scratch")
        return 0
    state = load_checkpoint(checkpoint, run.model, optimizer)
    if run.scaler is not None and state.get("grad_scaler"):
        run.scaler.load_state_dict(state["grad_scaler"])
    run.print(f"[tunelab] resumed from {checkpoint} (step {state['step']})")
    return state["step"]


def apply_gradients(run: Run, optimizer: torch.optim.Optimizer) -> tuple[float, bool]:
    """Clip the global gradient norm (`train.max_grad_norm`), step, zero. Returns (the norm before
    clipping, over every rank's shard under FSDP; whether the step was applied).

    A step whose gradient norm is not finite is not applied (the gradients are dropped). Under fp16
    the gradients are first divided by the loss scale S (`Run.backward` multiplied by it); the
    scaler then lowers S after such a step and raises it after `growth_interval` good ones."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if run.scaler is not None:
        run.scaler.unscale_(optimizer)
    norm = float(
        full_tensor(torch.nn.utils.clip_grad_norm_(params, run.config.train.max_grad_norm or float("inf")))
    )
    finite = math.isfinite(norm)
    if run.scaler is not None:
        run.scaler.step(optimizer)  # skips the update itself when the gradients hold inf or NaN
        run.scaler.update()
    elif finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm, finite


def accumulated_step(
    run: Run, optimizer: torch.optim.Optimizer, micro_batches: list[MicroBatch], loss_fn: LossFn
) -> dict:
    """One optimizer step over `micro_batches` (see the module docstring). Returns the step's
    figures: loss (per unit, global), grad_norm, tokens (global), `loss_fn`'s extras per unit, and
    `skipped` (1 when the step was not applied, with `skipped_examples` naming this rank's examples)."""
    units, tokens = (
        int(v)
        for v in run.dist.sum(sum(b.units for b in micro_batches), sum(b.tokens for b in micro_batches))
    )
    loss_total, extras = 0.0, {}
    for index, batch in enumerate(micro_batches):
        with run.dist.grad_sync(index == len(micro_batches) - 1):
            with run.autocast():
                loss_sum, extra = run.dist.forward(loss_fn, batch.tensors)
            # Ranks average gradients; x world_size turns that into their sum (distributed.py).
            run.backward(loss_sum * run.dist.world_size / max(units, 1))
        loss_total += float(loss_sum.detach())
        for key, value in extra.items():
            extras[key] = extras.get(key, 0.0) + float(value)
    loss_total, *extra_sums = run.dist.sum(loss_total, *extras.values())
    grad_norm, applied = apply_gradients(run, optimizer)
    figures = {
        "loss": loss_total / max(units, 1),
        "grad_norm": grad_norm,
        "tokens": tokens,
        **{key: value / max(units, 1) for key, value in zip(extras, extra_sums, strict=True)},
        "skipped": int(not applied),
    }
    if not applied:
        figures["skipped_examples"] = [i for batch in micro_batches for i in batch.examples]
    return figures


class StepLoop:
    """What every training loop does around its steps: set each step's learning rate; after each
    step evaluate, log, update the progress bar and save a checkpoint on their intervals; stop a
    run whose steps stay non-finite; on SIGTERM, SIGUSR1 or a first Ctrl-C, write a checkpoint at
    the end of the step and stop (`Preempted`); at the end, plot the loss curve.

    Non-finite steps: a step whose loss or gradient norm is NaN or inf is not applied
    (`apply_gradients`) and is counted in `skipped_steps` of `metrics.jsonl`; after
    `train.max_nonfinite_steps` of them in a row the run stops with a `TunelabError` naming the
    step and its examples. Under fp16 the loss scaler's skipped overflows are counted too, but only
    a loss that is not finite counts towards stopping (overflows are how the scaler finds its scale).
    """

    STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")

    def __init__(
        self,
        run: Run,
        optimizer: torch.optim.Optimizer,
        steps: int,
        start_step: int = 0,
        evaluate: Callable[[], dict] | None = None,
        desc: str = "train",
    ):
        cfg = run.config.train
        if run.is_main:
            # The run's config.yaml is written once training starts (the model, the data and any
            # checkpoint read): a run that fails before then leaves an earlier run's config.yaml
            # in the same folder as it was.
            (run.output_dir / "config.yaml").write_text(run.config_yaml)
        self.run, self.optimizer, self.steps, self.start_step = run, optimizer, steps, start_step
        self.evaluate = evaluate
        self.metrics = MetricsLog(
            run.output_dir, enabled=run.is_main, resume_step=start_step, config=run.config.to_dict()
        )
        self.history: list[dict] = []
        self.tokens_seen, self.started = 0, time.perf_counter()
        self.skipped_steps, self.nonfinite_in_a_row = 0, 0
        self.stop_signal: str | None = None
        run.model.train()
        self.bar = progress(steps, desc, initial=start_step, enabled=cfg.progress)

    def step_numbers(self) -> Iterator[int]:
        """The steps still to run; before each is yielded, its learning rate is set on the optimizer."""
        for step in range(self.start_step + 1, self.steps + 1):
            set_lr(self.optimizer, lr_at(step, self.steps, self.run.config.train))
            yield step

    def end_step(self, step: int, figures: dict, data_position: int) -> dict:
        """After `step` with its `figures` (holding `loss`, and `skipped`: updates not applied): add
        the step, learning rate, speed (tokens/s where the figures count tokens, else seconds since
        the start) and `skipped_steps`; evaluate, log, keep the row in the history; stop a run that
        stays non-finite; save a checkpoint holding `data_position` when one is due or a stop was
        asked for. Returns the row."""
        cfg, model = self.run.config.train, self.run.model
        examples = figures.pop("skipped_examples", None)
        skipped = figures.pop("skipped", 0)
        self.skipped_steps += skipped
        row = {"step": step, **figures, "lr": self.optimizer.param_groups[0]["lr"]}
        elapsed = time.perf_counter() - self.started
        if "tokens" in figures:
            self.tokens_seen += figures["tokens"]
            row["tokens_per_s"] = self.tokens_seen / max(elapsed, 1e-9)
        else:
            row["seconds"] = elapsed
        row["skipped_steps"] = self.skipped_steps
        do_eval = (
            self.evaluate is not None
            and cfg.eval_every
            and (step % cfg.eval_every == 0 or step == self.steps)
        )
        if do_eval:
            model.eval()
            row.update(self.evaluate())
            model.train()
        if step % cfg.log_every == 0 or do_eval or step == self.steps or skipped:
            self.metrics.log(row)
            self.bar.set_postfix(**self._postfix(row))
        self.history.append(row)
        self.bar.update(1)
        self._check_finite(step, row["loss"], skipped, examples)
        saved = None
        if cfg.save_every and step % cfg.save_every == 0 and step != self.steps:
            saved = self._save(step, data_position)
        if self._stop_requested():
            raise Preempted(
                self.stop_signal or "a signal on another rank", step, saved or self._save(step, data_position)
            )
        return row

    def _check_finite(self, step: int, loss: float, skipped: int, examples: list[int] | None) -> None:
        """Count the non-finite steps in a row; past `train.max_nonfinite_steps`, stop the run."""
        counts = not math.isfinite(loss) or (skipped and self.run.scaler is None)
        self.nonfinite_in_a_row = self.nonfinite_in_a_row + 1 if counts else 0
        if counts:
            self.run.print(f"[tunelab] step {step}: loss or gradient not finite; the step was not applied")
        if self.nonfinite_in_a_row > self.run.config.train.max_nonfinite_steps:
            first = step - self.nonfinite_in_a_row + 1
            shown = f"; its examples (training-set indices) {examples[:16]}" if examples else ""
            raise TunelabError(
                f"steps {first}-{step} were not finite (loss {loss}){shown}; the last checkpoint, "
                f"{latest_checkpoint(self.run.output_dir) or 'none'}, is intact "
                "(train.max_nonfinite_steps sets how many such steps in a row are tolerated)"
            )

    def _save(self, step: int, data_position: int) -> Path:
        extra = {"grad_scaler": self.run.scaler.state_dict()} if self.run.scaler is not None else None
        return save_checkpoint(
            self.run.output_dir,
            step,
            self.run.model,
            self.optimizer,
            data_position,
            self.run.config_yaml,
            self.run.config.train.keep_last,
            extra_state=extra,
            is_main=self.run.is_main,
        )

    def _stop_requested(self) -> bool:
        """Whether a stop signal arrived, on any rank (every rank must stop after the same step)."""
        asked = self.stop_signal is not None
        if self.run.dist.world_size > 1:
            asked = self.run.dist.sum(float(asked))[0] > 0
        return asked

    def _on_signal(self, number: int, frame) -> None:
        if number == signal.SIGINT and self.stop_signal is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: stop at once
        self.stop_signal = signal.Signals(number).name
        self.run.print(
            f"\n[tunelab] {self.stop_signal}: stopping after this step with a checkpoint"
            + (" (Ctrl-C again to stop at once)" if number == signal.SIGINT else "")
        )

    @staticmethod
    def _postfix(row: dict) -> dict[str, str]:
        """What the progress bar shows: the loss, and tokens/s or the reward."""
        postfix = {"loss": f"{row['loss']:.4f}"}
        if "tokens_per_s" in row:
            postfix["tok_s"] = f"{row['tokens_per_s']:.0f}"
        if "reward" in row:
            postfix["reward"] = f"{row['reward']:.3f}"
        return postfix

    def result(self) -> LoopResult:
        """The steps, the last step's loss and every step's row. A run resumed from its last step
        runs none: its last loss is the one `metrics.jsonl` holds."""
        return LoopResult(
            self.steps, self.history[-1]["loss"] if self.history else self.logged_loss(), self.history
        )

    def logged_loss(self) -> float | None:
        """The last loss in this run's `metrics.jsonl` (None where there is none, or off rank 0)."""
        path = self.run.output_dir / "metrics.jsonl"
        if not self.run.is_main or not path.is_file():
            return None
        losses = [row["loss"] for row in read_metrics(self.run.output_dir) if "loss" in row]
        return losses[-1] if losses else None

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Around the steps: the stop signals are caught (and given back afterwards); an interrupt
        closes the log, names the last checkpoint and re-raises; a normal end closes the log and
        plots the loss curve."""
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for name in self.STOP_SIGNALS:
                number = getattr(signal, name, None)
                if number is not None:
                    previous[number] = signal.signal(number, self._on_signal)
        try:
            yield
        except KeyboardInterrupt:
            last = latest_checkpoint(self.run.output_dir)
            self.run.print(
                f"\n[tunelab] interrupted; the last checkpoint is {last or 'none'}. "
                "Continue with `train.resume=true`."
            )
            raise
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
            self.bar.close()
            self.metrics.close()
        if self.run.is_main and self.history:
            plot_loss(self.run.output_dir)

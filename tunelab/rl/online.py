"""What the online objectives (PPO, GRPO) share around their updates: setting up the run with its
prompts and rewards, the prompt batches of each step, sampling and scoring rollouts, evaluation on
held-out prompts, and the end of the run.

Prompt batches: step k takes the k-th batch of `train.batch_size x ranks` prompts of the seeded
order (`tunelab.data.collate.batch_stream`), and each rank takes the same number of them
(`Parallel.even_shard`) with their positions in the global batch, from which the sampling keys
are made (tunelab/rl/rollouts.py): so a response depends on its prompt, step and position only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from tunelab.config import RunConfig
from tunelab.data.collate import batch_stream
from tunelab.data.preference import PromptData, PromptExample, prepare_prompts
from tunelab.models import disable_dropout
from tunelab.rl.rewards import Rewards
from tunelab.rl.rollouts import Rollout, generate_rollouts, prompt_columns, sampling_keys
from tunelab.training.loop import LoopResult, apply_gradients
from tunelab.training.setup import Run, report_data, save_final, setup_run, write_summary

PromptBatch = tuple[list[int], list[PromptExample]]
"""This rank's positions in the step's global batch, and its prompts."""


def split(indices: torch.Tensor, parts: int) -> list[torch.Tensor]:
    """`indices` in `parts` nearly equal, non-empty chunks."""
    return [chunk for chunk in indices.tensor_split(parts) if len(chunk)]


ChunkLoss = Callable[[torch.Tensor, object], tuple[torch.Tensor, dict[str, float]]]
"""(rollout rows of a micro-batch, the mini-batch's normaliser) -> (loss to back-propagate, logged
parts already divided by the normaliser)."""


def policy_updates(
    run: Run,
    optimizer: torch.optim.Optimizer,
    n: int,
    passes: int,
    num_mini_batches: int,
    micro: int,
    normaliser: Callable[[torch.Tensor], object],
    chunk_loss: ChunkLoss,
) -> dict[str, float]:
    """`passes` over this rank's N rollouts, each in `num_mini_batches` shuffled mini-batches (one
    optimizer step each) split into `micro` micro-batches. `normaliser(rows)` gives what a
    mini-batch's losses are divided by (global over ranks: every rank's mini-batch j is a part of
    global mini-batch j); every backward runs through `Parallel.forward`, DDP synchronising on the
    last micro-batch. Returns each logged part summed over ranks and averaged over the updates,
    and the mean gradient norm."""
    totals: dict[str, float] = {}
    grad_norm, updates = 0.0, 0
    for _ in range(passes):
        for rows in split(torch.randperm(n), num_mini_batches):
            norm = normaliser(rows)
            chunks = split(rows, micro)
            for index, chunk in enumerate(chunks):
                with run.dist.grad_sync(index == len(chunks) - 1):
                    with run.autocast():
                        loss, parts = run.dist.forward(chunk_loss, chunk, norm)
                    (loss * run.dist.world_size).backward()  # ranks average gradients: x W gives their sum
                for key, value in parts.items():
                    totals[key] = totals.get(key, 0.0) + value
            grad_norm += apply_gradients(run, optimizer)
            updates += 1
    sums = dict(zip(totals, run.dist.sum(*totals.values()), strict=True))
    return {**{key: value / updates for key, value in sums.items()}, "grad_norm": grad_norm / updates}


@dataclass
class OnlineRun:
    """A set-up PPO or GRPO run: the run, its prompts and rewards, and the sampling settings."""

    run: Run
    data: PromptData
    rewards: Rewards
    max_new_tokens: int
    temperature: float
    top_p: float
    answer: str
    """What the objective calls a sampled answer in its metrics: `response` or `completion`."""

    @classmethod
    def setup(cls, config: RunConfig, answer: str) -> OnlineRun:
        """Set up the run (model, method), read the prompts, load the rewards, turn dropout off
        (the policy, its rollouts and the reference must agree)."""
        options = config.objective.options
        run = setup_run(config)
        data = prepare_prompts(config.data, run.tokenizer, seed=config.train.seed)
        eval_count = len(data.eval) if data.eval else 0
        report_data(run, len(data.train), eval_count, "prompts", f"template {data.template}", data.notes)
        rewards = Rewards(
            options.reward_functions,
            options.reward_weights,
            options.reward_model,
            run.tokenizer,
            data.template,
            run.device,
            config.model.dtype,
        )
        disable_dropout(run.model)
        return cls(run, data, rewards, options.max_new_tokens, options.temperature, options.top_p, answer)

    def steps(self) -> int:
        """`train.max_steps`, or the steps of `train.epochs` passes over the prompts."""
        train = self.run.config.train
        if train.max_steps:
            return train.max_steps
        return max(1, -(-int(train.epochs * len(self.data.train)) // self.run.global_batch))

    def prompt_batches(self, position: int) -> Iterator[PromptBatch]:
        """This rank's part of every step's global prompt batch, from step `position` on."""
        lengths = [len(p.prompt_ids) for p in self.data.train]
        seed = self.run.config.train.seed
        for indices in batch_stream(lengths, self.run.global_batch, seed, position):
            positions = self.run.dist.even_shard(len(indices))
            yield positions, [self.data.train[indices[i]] for i in positions]

    def sample(self, prompts: list[PromptExample], step: int, positions: list[int]) -> Rollout:
        """One sampled answer per prompt; `positions`: each prompt's place in the global batch (the
        sampling key, with the seed and the step)."""
        keys = sampling_keys(self.run.config.train.seed, step, positions)
        return self._generate(prompts, greedy=False, keys=keys)

    def _generate(self, prompts: list[PromptExample], greedy: bool, keys=None) -> Rollout:
        return generate_rollouts(
            self.run.model,
            self.run.tokenizer,
            [p.prompt_ids for p in prompts],
            self.max_new_tokens,
            self.temperature,
            self.top_p,
            greedy,
            keys=keys,
        )

    def score(self, prompts: list[PromptExample], rollout: Rollout) -> tuple[torch.Tensor, dict]:
        """(scores (N,), each reward's scores by name) of the rollout's answers."""
        return self.rewards.score(
            [p.prompt for p in prompts],
            rollout.completions,
            rollout.completion_ids,
            prompt_columns([p.extra for p in prompts]),
            rollout.input_ids,
            rollout.attention_mask,
        )

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean score (and per reward) and length of greedy answers to the held-out prompts (up to
        `eval.num_examples`). Every rank evaluates the same prompts (under FSDP the forward passes
        are collective)."""
        cfg = self.run.config.eval
        prompts = self.data.eval[: cfg.num_examples]
        totals, count = {}, 0
        for start in range(0, len(prompts), cfg.batch_size):
            batch = prompts[start : start + cfg.batch_size]
            rollout = self._generate(batch, greedy=True)
            scores, parts = self.score(batch, rollout)
            sums = {
                "eval_reward": scores,
                **{f"eval_reward/{k}": v for k, v in parts.items()},
                f"eval_{self.answer}_length": rollout.response_mask,
            }
            for name, values in sums.items():
                totals[name] = totals.get(name, 0.0) + float(values.sum())
            count += len(batch)
        return {key: value / max(count, 1) for key, value in totals.items()}

    def finish(self, result: LoopResult, before: dict, last_keys: tuple[str, ...] = ()) -> dict:
        """Evaluate again, save `final/` (every rank; call it once heads are detached and reference
        copies dropped) and write `summary.json`; returns the summary. `last_keys`: metrics of the
        last step to report besides reward."""
        first, last = (result.history[0], result.history[-1]) if result.history else ({}, {})
        summary = {
            "steps": result.steps,
            "final_train_loss": result.final_loss,
            "reward_first_step": first.get("reward"),
            "reward_last_step": last.get("reward"),
            **{f"{key}_last_step": last.get(key) for key in last_keys},
        }
        if self.data.eval:
            summary.update({f"{k}_before": v for k, v in before.items()})
            summary.update(self.evaluate())
        final = save_final(self.run)
        summary["final_dir"] = str(final)
        return write_summary(self.run, summary)

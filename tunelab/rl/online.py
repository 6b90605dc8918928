"""What the online objectives (PPO, GRPO) share around their updates: the options they share, setting
up the run with its prompts and rewards, the prompt batches of each step, sampling and scoring
rollouts, evaluation on held-out prompts, and the end of the run.

Prompt batches: step k takes the k-th batch of `train.batch_size x ranks` prompts of the seeded
order (`tunelab.data.collate.batch_stream`), and each rank takes the same number of them
(`Parallel.even_shard`) with their positions in the global batch, from which the sampling keys
are made (tunelab/rl/rollouts.py): so a response depends on its prompt, step and position only.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from tunelab.config import RunConfig
from tunelab.data.collate import batch_stream
from tunelab.data.preference import PromptData, PromptExample, prepare_prompts
from tunelab.models import disable_dropout
from tunelab.rl.rewards import Rewards, check_reward_spec
from tunelab.rl.rollouts import Rollout, generate_rollouts, prompt_columns, sampling_keys
from tunelab.trained import start_tokenizer
from tunelab.training.loop import LoopResult
from tunelab.training.setup import Run, before_and_after, report_data, save_final, setup_run, write_summary

PromptBatch = tuple[list[int], list[PromptExample]]
"""This rank's positions in the step's global batch, and its prompts."""


@dataclass
class OnlineOptions:
    """The options PPO and GRPO share: where the score comes from, how answers are sampled, and
    how many optimizer steps a pass over them takes. Each objective's `Options` adds its own."""

    reward_model: str | None = None
    """A reward model trained with `objective: reward` (its run folder or `final/`; weight 1); same tokenizer."""
    reward_functions: list[str] = field(default_factory=list)
    """Python reward functions, `package.module:function` or `path/file.py:function` (see tunelab/rl/rewards.py)."""
    reward_weights: list[float] | None = None
    """Weight of each reward function (default 1 each); the reward model's weight is 1."""
    max_new_tokens: int = 64
    """Longest answer sampled."""
    temperature: float = 1.0
    """Sampling temperature tau; the log-probs are those of the tempered policy."""
    top_p: float = 1.0
    """Nucleus sampling: sample from the smallest token set holding this much probability."""
    num_mini_batches: int = 1
    """Optimizer steps per pass over a step's answers: they are split into this many mini-batches."""

    def __post_init__(self):
        check_reward_spec(self.reward_functions, self.reward_weights, self.reward_model)
        for name in ("max_new_tokens", "num_mini_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be > 0 and top_p in (0, 1]")


@dataclass
class Sampled:
    """A step's sampled answers with their scores."""

    rollout: Rollout
    mask: torch.Tensor
    """(N, R) float on the run's device: 1 on answer tokens up to and including the first EOS."""
    scores: torch.Tensor
    """(N,) the weighted score of each answer."""
    parts: dict[str, torch.Tensor]
    """Each reward's scores (N,) by name, unweighted."""

    @property
    def size(self) -> int:
        """N, the answers sampled."""
        return len(self.scores)


@dataclass
class OnlineRun:
    """A set-up PPO or GRPO run: the run, its prompts and rewards, and the sampling settings."""

    run: Run
    data: PromptData
    rewards: Rewards
    options: OnlineOptions
    answer: str
    """What the objective calls a sampled answer in its metrics: `response` or `completion`."""

    @classmethod
    def setup(cls, config: RunConfig, answer: str) -> OnlineRun:
        """Set up the run (model, method), read the prompts (noting that `data.packing` does not
        apply: rollouts are padded), load the rewards, turn dropout off (the policy, its rollouts
        and the reference must agree)."""
        options = config.objective.options
        tokenizer = start_tokenizer(config)
        data = prepare_prompts(
            config.data, tokenizer, seed=config.train.seed
        )  # checked before the model loads
        run = setup_run(config, tokenizer)
        eval_count = len(data.eval) if data.eval else 0
        report_data(run, len(data.train), eval_count, "prompts", f"template {data.template}", data.notes)
        if config.data.packing:
            objective = config.objective.name
            run.print(
                f"[tunelab] data.packing: true is ignored by objective {objective}; rollouts are padded"
            )
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
        return cls(run, data, rewards, options, answer)

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

    def sample_and_score(self, prompts: list[PromptExample], step: int, positions: list[int]) -> Sampled:
        """One sampled answer per prompt, and its scores; `positions`: each prompt's place in the
        global batch (the sampling key, with the seed and the step)."""
        keys = sampling_keys(self.run.config.train.seed, step, positions)
        rollout = self._generate(prompts, greedy=False, keys=keys)
        scores, parts = self._score(prompts, rollout)
        return Sampled(rollout, rollout.response_mask.to(self.run.device), scores, parts)

    def _generate(self, prompts: list[PromptExample], greedy: bool, keys=None) -> Rollout:
        return generate_answers(self.run.model, self.run.tokenizer, prompts, self.options, greedy, keys)

    def _score(self, prompts: list[PromptExample], rollout: Rollout) -> tuple[torch.Tensor, dict]:
        """(scores (N,), each reward's scores by name) of the rollout's answers."""
        return score_answers(self.rewards, prompts, rollout)

    def evaluate(self) -> dict:
        """`held_out_rewards` of the policy on the held-out prompts (up to `eval.num_examples`).
        Every rank evaluates the same prompts (under FSDP the forward passes are collective)."""
        cfg = self.run.config.eval
        prompts = self.data.eval[: cfg.num_examples]
        return held_out_rewards(
            self.run.model,
            self.run.tokenizer,
            prompts,
            self.rewards,
            self.options,
            cfg.batch_size,
            self.answer,
        )

    def global_means(self, sums: dict[str, torch.Tensor | float], count: int) -> dict[str, float]:
        """Each local sum summed over ranks and divided by `count` summed over ranks."""
        total, *values = self.run.dist.sum(count, *(float(v) for v in sums.values()))
        return {key: value / total for key, value in zip(sums, values, strict=True)}

    def finish(self, result: LoopResult, before: dict, last_keys: tuple[str, ...] = ()) -> dict:
        """Save `final/` (every rank; call it once heads are detached), evaluate again and write
        `summary.json`; returns the summary. `last_keys`: metrics of the last step to report
        besides reward."""
        final = save_final(self.run)
        first, last = (result.history[0], result.history[-1]) if result.history else ({}, {})
        summary = {
            "steps": result.steps,
            "final_train_loss": result.final_loss,
            "reward_first_step": first.get("reward"),
            "reward_last_step": last.get("reward"),
            **{f"{key}_last_step": last.get(key) for key in last_keys},
        }
        if self.data.eval:
            summary.update(before_and_after(before, self.evaluate()))
        return write_summary(self.run, summary, final)


def generate_answers(
    model, tokenizer, prompts: list[PromptExample], options: OnlineOptions, greedy: bool, keys=None
) -> Rollout:
    """One answer per prompt under the run's sampling options (greedy: the most likely tokens)."""
    return generate_rollouts(
        model,
        tokenizer,
        [p.prompt_ids for p in prompts],
        options.max_new_tokens,
        options.temperature,
        options.top_p,
        greedy,
        keys=keys,
    )


def score_answers(
    rewards: Rewards, prompts: list[PromptExample], rollout: Rollout
) -> tuple[torch.Tensor, dict]:
    """(scores (N,), each reward's scores by name) of the rollout's answers to `prompts`."""
    return rewards.score(
        [p.prompt for p in prompts],
        rollout.completions,
        rollout.completion_ids,
        prompt_columns([p.extra for p in prompts]),
        rollout.input_ids,
        rollout.attention_mask,
    )


@torch.no_grad()
def held_out_rewards(
    model,
    tokenizer,
    prompts: list[PromptExample],
    rewards: Rewards,
    options: OnlineOptions,
    batch_size: int,
    answer: str,
) -> dict:
    """Mean over `prompts` of the score of the greedy answer (`eval_reward`), of each reward
    (`eval_reward/NAME`) and of the answer's length in tokens (`eval_ANSWER_length`), in batches of
    `batch_size` prompts. What PPO and GRPO log before and after training, and `tunelab eval` of
    their runs."""
    totals, count = {}, 0
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        rollout = generate_answers(model, tokenizer, batch, options, greedy=True)
        scores, parts = score_answers(rewards, batch, rollout)
        sums = {
            "eval_reward": scores,
            **{f"eval_reward/{k}": v for k, v in parts.items()},
            f"eval_{answer}_length": rollout.response_mask,
        }
        for name, values in sums.items():
            totals[name] = totals.get(name, 0.0) + float(values.sum())
        count += len(batch)
    return {key: value / max(count, 1) for key, value in totals.items()}

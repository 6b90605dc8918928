"""GRPO: sample a group of completions per prompt and push up those that beat their group.

Shao et al. 2024 ("DeepSeekMath"), as refined by DAPO (Yu et al. 2025) and Dr. GRPO (Liu et al.
2025). Each step, for `train.batch_size` prompts:

1. a group of G = `num_generations` completions per prompt, sampled at temperature tau / top-p
   (tunelab/rl/rollouts.py);
2. a score per completion: the weighted sum of Python reward functions (and/or a reward model;
   tunelab/rl/rewards.py);
3. group advantages A_i = (s_i - mean_group s) / (std_group s + 1e-4), or s_i - mean_group s with
   `scale_rewards: false` (tunelab/rl/advantages.py); no value model;
4. `num_iterations` passes (mu) over the completions in `num_mini_batches` mini-batches, one
   optimizer step each, minimising

       l_{i,t} = -min(rho A_i, clip(rho, 1 - eps, 1 + eps_high) A_i) + beta * k3(pi || pi_ref)

   aggregated over tokens as `loss_aggregation` says (`sequence`, `token`, `constant`; see
   tunelab/losses/grpo.py). rho = pi / pi_old = 1 on the first pass of a single mini-batch, where
   the loss gradient is the policy gradient. The k3 KL term (beta > 0) uses the reference policy:
   the method disabled, or a frozen copy (tunelab/reference.py).

Logged per step: reward (and per reward function), reward_std, kl (mean k3 per token, when
beta > 0), entropy, clip_frac, completion_length, eos_fraction. `final/` holds the policy.

Under torchrun each of W ranks takes `train.batch_size` prompts (with their whole groups) of a
global batch of W times as many; completions are sampled with keys (tunelab/rl/rollouts.py), and
the loss units (sequences or tokens) and every logged figure are taken over the global batch, so
W ranks x b prompts take the step of one process x W * b (up to floating-point order).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from tunelab.config import RunConfig
from tunelab.logprobs import final_hidden, logprobs_from_hidden
from tunelab.losses.grpo import aggregate_loss, grpo_per_token_loss
from tunelab.losses.kl import kl_k3
from tunelab.reference import Reference, reference_logprobs
from tunelab.rl.advantages import group_advantages
from tunelab.rl.loop import online_loop
from tunelab.rl.online import OnlineRun, PromptBatch, policy_updates, split
from tunelab.rl.rewards import check_reward_spec


@dataclass
class Options:
    reward_functions: list[str] = field(default_factory=list)
    """Python reward functions, `package.module:function` or `path/file.py:function` (see tunelab/rl/rewards.py)."""
    reward_weights: list[float] | None = None
    """Weight of each reward function (default 1 each)."""
    reward_model: str | None = None
    """Optionally also a reward model trained with `objective: reward` (weight 1); same tokenizer."""
    num_generations: int = 8
    """G, completions sampled per prompt (the group)."""
    max_new_tokens: int = 64
    """Longest completion sampled (also L of the `constant` aggregation)."""
    temperature: float = 1.0
    """Sampling temperature tau; the log-probs are those of the tempered policy."""
    top_p: float = 1.0
    """Nucleus sampling: sample from the smallest token set holding this much probability."""
    num_iterations: int = 1
    """mu: passes over each batch of completions."""
    num_mini_batches: int = 1
    """Optimizer steps per pass: the completions are split into this many mini-batches."""
    epsilon: float = 0.2
    """Lower clip eps of the ratio, 1 - eps."""
    epsilon_high: float | None = None
    """Upper clip of the ratio, 1 + eps_high (DAPO's clip-higher uses 0.28); default `epsilon`."""
    beta: float = 0.0
    """Weight of the k3 KL penalty to the reference policy (0: no reference needed, as TRL's default)."""
    loss_aggregation: Literal["sequence", "token", "constant"] = "token"
    """How token losses are averaged: `sequence` (GRPO: per completion, then over completions),
    `token` (DAPO: over all tokens of the mini-batch), `constant` (Dr. GRPO: sum / (completions * max_new_tokens))."""
    scale_rewards: bool = True
    """Divide the advantages by the group's reward std (false: Dr. GRPO's unscaled advantages)."""

    def __post_init__(self):
        check_reward_spec(self.reward_functions, self.reward_weights, self.reward_model)
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be at least 2 (a group), not {self.num_generations}")
        for name in ("max_new_tokens", "num_iterations", "num_mini_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be > 0 and top_p in (0, 1]")
        if self.epsilon <= 0 or (self.epsilon_high is not None and self.epsilon_high <= 0) or self.beta < 0:
            raise ValueError("epsilon and epsilon_high must be > 0, beta >= 0")


def run(config: RunConfig) -> dict:
    """Train a policy with GRPO; returns the summary written to `summary.json`."""
    cfg, options = config, config.objective.options
    online = OnlineRun.setup(cfg, answer="completion")
    run_, model = online.run, online.run.model
    reference = Reference(model, run_.method, run_.dist.frozen_copy) if options.beta > 0 else None
    run_.print(
        f"[tunelab] rewards: {', '.join(online.rewards.names)}; "
        f"reference policy: {reference.kind if reference else 'none (beta = 0)'}"
    )
    group, micro = options.num_generations, max(1, cfg.train.grad_accum)
    reuse = options.num_iterations > 1 or options.num_mini_batches > 1  # pi_old differs from pi

    def policy_logprobs(rows: dict, prompt_length: int, with_entropy: bool = False):
        """Completion-aligned (logprobs, entropy), each (n, R), of some rollout rows."""
        hidden = final_hidden(model, rows["input_ids"], rows["attention_mask"])
        logprobs, entropy = logprobs_from_hidden(
            model, hidden, rows["input_ids"], rows["target_mask"], options.temperature, with_entropy
        )
        return logprobs[:, prompt_length:], entropy[:, prompt_length:] if with_entropy else None

    def chunk_loss(rows: dict, p: int, chunk, norm, old_logprobs, ref_logprobs, advantages, mask):
        """The GRPO loss of some rows (their aggregated sum / the mini-batch's units) and the logged
        parts (the loss; clip fraction, entropy, k3 per token of the mini-batch). norm: (units, tokens)."""
        units, tokens = norm
        logprobs, entropy = policy_logprobs(rows, p, with_entropy=True)
        logprobs = logprobs.float()
        old = old_logprobs[chunk] if reuse else logprobs.detach()
        ref = ref_logprobs[chunk] if ref_logprobs is not None else None
        per_token, clipped = grpo_per_token_loss(
            logprobs, old, advantages[chunk], options.epsilon, options.epsilon_high, ref, options.beta
        )
        m = mask[chunk]
        loss_sum, _ = aggregate_loss(per_token, m, options.loss_aggregation, options.max_new_tokens)
        loss = loss_sum / units
        parts = {
            "loss": float(loss.detach()),
            "clip_frac": float((clipped * m).sum()) / tokens,
            "entropy": float((entropy * m).sum()) / tokens,
        }
        if ref is not None:
            parts["kl"] = float((kl_k3(logprobs.detach(), ref) * m).sum()) / tokens
        return loss, parts

    def step_fn(step: int, batch: PromptBatch, optimizer) -> dict:
        positions, prompts = batch
        # 1-3. A group of completions per prompt (keyed: the same whatever the rank), their scores
        # and group advantages (a group never spans ranks).
        prompts = [prompt for prompt in prompts for _ in range(group)]
        rollout = online.sample(prompts, step, [i * group + g for i in positions for g in range(group)])
        p, n = rollout.prompt_length, len(prompts)
        mask = rollout.response_mask.to(run_.device)  # (N, R)
        scores, parts = online.score(prompts, rollout)
        advantages = group_advantages(scores, group, options.scale_rewards).to(run_.device)  # (N,)

        # pi_old (when the policy moves between the sampling and a later update) and pi_ref.
        old_logprobs = ref_logprobs = None
        with torch.no_grad(), run_.autocast():
            if reuse:
                old_logprobs = torch.cat(
                    [policy_logprobs(rollout.rows(c), p)[0] for c in split(torch.arange(n), micro)]
                )
            if reference is not None:
                ref_logprobs = torch.cat(
                    [
                        reference_logprobs(reference, **rollout.rows(c), temperature=options.temperature)[
                            :, p:
                        ]
                        for c in split(torch.arange(n), micro)
                    ]
                )

        def normaliser(rows: torch.Tensor) -> tuple[float, float]:
            """(units, tokens) of the global mini-batch (units: sequences, tokens or sequences x L)."""
            _, local_units = aggregate_loss(
                mask[rows], mask[rows], options.loss_aggregation, options.max_new_tokens
            )
            units, tokens = run_.dist.sum(local_units, float(mask[rows].sum()))
            return units, max(tokens, 1.0)

        # 4. mu passes over mini-batches (normalised over each global mini-batch), in micro-batches.
        tensors = (old_logprobs, ref_logprobs, advantages, mask)
        row = policy_updates(
            run_,
            optimizer,
            n,
            options.num_iterations,
            options.num_mini_batches,
            micro,
            normaliser,
            chunk_loss=lambda chunk, norm: chunk_loss(rollout.rows(chunk), p, chunk, norm, *tensors),
        )

        # Figures of the global batch: sums over ranks / completions or groups.
        group_std = scores.view(-1, group).std(dim=1)  # (N / G,)
        local = {
            "reward": scores.sum(),
            "completion_length": mask.sum(),
            "eos_fraction": rollout.ended.float().sum(),
            **{f"reward/{name}": values.sum() for name, values in parts.items()},
        }
        per_group = {
            "reward_std": group_std.sum(),
            "zero_std_fraction": (group_std == 0).float().sum(),
        }
        count, groups, *values = run_.dist.sum(
            n, n // group, *(float(v) for v in (*local.values(), *per_group.values()))
        )
        row.update({key: value / count for key, value in zip(local, values[: len(local)], strict=True)})
        row.update({key: value / groups for key, value in zip(per_group, values[len(local) :], strict=True)})
        return row

    before = online.evaluate() if online.data.eval else {}
    evaluate = online.evaluate if online.data.eval else None
    result = online_loop(run_, online.prompt_batches, step_fn, online.steps(), evaluate)
    if reference is not None:
        reference.copy = None
    return online.finish(result, before)

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

from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedModel

from tunelab.config import RunConfig
from tunelab.logprobs import final_hidden
from tunelab.losses.grpo import aggregate_loss, grpo_per_token_loss
from tunelab.losses.kl import kl_k3
from tunelab.reference import Reference
from tunelab.rl.advantages import group_advantages
from tunelab.rl.online import OnlineOptions, OnlineRun, PromptBatch, Sampled
from tunelab.rl.policy import answer_logprobs, reference_answer_logprobs
from tunelab.rl.rollouts import Rollout
from tunelab.rl.updates import policy_updates, split
from tunelab.training.loop import StepLoop, resume
from tunelab.training.optim import build_optimizer
from tunelab.training.setup import Run


@dataclass
class Options(OnlineOptions):
    """GRPO's options, after the options it shares with PPO (tunelab/rl/online.py)."""

    num_generations: int = 8
    """G, completions sampled per prompt (the group)."""
    num_iterations: int = 1
    """mu: passes over each batch of completions."""
    epsilon: float = 0.2
    """Lower clip eps of the ratio, 1 - eps."""
    epsilon_high: float | None = None
    """Upper clip of the ratio, 1 + eps_high (DAPO's clip-higher uses 0.28); default `epsilon`."""
    beta: float = 0.0
    """Weight of the k3 KL penalty to the reference policy (0: no reference needed, as TRL's default)."""
    loss_aggregation: Literal["sequence", "token", "constant"] = "token"
    """How token losses are averaged: `sequence` (GRPO: per completion, then over completions),
    `token` (DAPO: over all tokens of the mini-batch), `constant` (Dr. GRPO: sum / (completions * L), L = `max_new_tokens`)."""
    scale_rewards: bool = True
    """Divide the advantages by the group's reward std (false: Dr. GRPO's unscaled advantages)."""

    def __post_init__(self):
        super().__post_init__()
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be at least 2 (a group), not {self.num_generations}")
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations must be at least 1, not {self.num_iterations}")
        if self.epsilon <= 0 or (self.epsilon_high is not None and self.epsilon_high <= 0) or self.beta < 0:
            raise ValueError("epsilon and epsilon_high must be > 0, beta >= 0")


def run(config: RunConfig) -> dict:
    """Train a policy with GRPO; returns the summary written to `summary.json`."""
    # Set-up: the policy with its method, the prompts and rewards, the reference (when beta > 0).
    options = config.objective.options
    online = OnlineRun.setup(config, answer="completion")
    run, model = online.run, online.run.model
    reference = Reference(model, run.method, run.dist.frozen_copy, run.start) if options.beta > 0 else None
    run.print(
        f"[tunelab] rewards: {', '.join(online.rewards.names)}; "
        f"reference policy: {reference.kind if reference else 'none (beta = 0)'}"
    )
    policy = Policy(model, reference, options)
    evaluate = online.evaluate if online.data.eval else None
    # DDP or FSDP2 under torchrun (the reference copy comes first; under FSDP each rank reads its
    # shard of the weights here, so the held-out figures come after it).
    run.dist.wrap(model)
    before = evaluate() if evaluate else {}
    steps = online.steps()
    optimizer = build_optimizer(model, config.train)
    start = resume(run, optimizer)
    prompt_batches = online.prompt_batches(position=start)

    # The loop: each step samples a group of completions per prompt, scores them and learns from them.
    loop = StepLoop(run, optimizer, steps, start, evaluate, desc="rl")
    with loop.running():
        for step in loop.step_numbers():
            loop.end_step(step, grpo_step(online, policy, optimizer, step, next(prompt_batches)), step)

    # The end: `final/` (the policy), then held-out scores, `summary.json`.
    if reference is not None:
        reference.copy = None  # the held-out scores need no reference: free a frozen copy before saving
    return online.finish(loop.result(), before)


@dataclass
class Policy:
    """What GRPO trains and compares with: the policy and the frozen reference (None for beta = 0)."""

    model: PreTrainedModel
    reference: Reference | None
    options: Options

    @property
    def reuses_samples(self) -> bool:
        """Whether the policy moves between sampling and a later update (several passes or
        mini-batches), so that pi_old must be kept rather than taken as the detached pi."""
        return self.options.num_iterations > 1 or self.options.num_mini_batches > 1

    def logprobs(self, rows: dict, prompt_length: int, with_entropy: bool = False):
        """Completion-aligned (logprobs, entropy or None), each (n, R), of some rollout rows."""
        hidden = final_hidden(self.model, rows["input_ids"], rows["attention_mask"])  # (n, P+R, H)
        temperature = self.options.temperature
        return answer_logprobs(self.model, hidden, rows, prompt_length, temperature, with_entropy)


def grpo_step(online: OnlineRun, policy: Policy, optimizer, step: int, prompt_batch: PromptBatch) -> dict:
    """Steps 1-4 of the module docstring on one batch of prompts; returns the step's figures."""
    run, options = online.run, policy.options
    group = options.num_generations
    positions, prompts = prompt_batch
    # 1-2. A group of completions per prompt (keyed: the same whatever the rank) and their scores.
    prompts = [prompt for prompt in prompts for _ in range(group)]
    sampled = online.sample_and_score(prompts, step, [i * group + g for i in positions for g in range(group)])
    batch = grpo_batch(
        run, policy, sampled
    )  # 3. group advantages (a group never spans ranks), pi_old, pi_ref
    micro = max(1, run.config.train.grad_accum)
    figures = policy_updates(
        run, optimizer, batch, options.num_iterations, options.num_mini_batches, micro
    )  # 4.
    sums = {
        "reward": sampled.scores.sum(),
        "completion_length": sampled.mask.sum(),
        "eos_fraction": sampled.rollout.ended.float().sum(),
        **{f"reward/{name}": values.sum() for name, values in sampled.parts.items()},
    }
    figures.update(online.global_means(sums, sampled.size))  # figures of the global batch
    group_std = sampled.scores.view(-1, group).std(dim=1)  # (N / G,)
    per_group = {"reward_std": group_std.sum(), "zero_std_fraction": (group_std == 0).float().sum()}
    figures.update(online.global_means(per_group, len(group_std)))
    return figures


@torch.no_grad()
def grpo_batch(run: Run, policy: Policy, sampled: Sampled) -> GRPOBatch:
    """Group advantages of the scores, and the completions' log-probs under pi_old (when samples
    are reused) and pi_ref (when beta > 0): the `GRPOBatch` the updates read."""
    options, rollout = policy.options, sampled.rollout
    advantages = group_advantages(sampled.scores, options.num_generations, options.scale_rewards)  # (N,)
    micro = max(1, run.config.train.grad_accum)
    old_logprobs = ref_logprobs = None
    with run.autocast():
        if policy.reuses_samples:
            chunks = split(torch.arange(sampled.size), micro)
            p = rollout.prompt_length
            old_logprobs = torch.cat([policy.logprobs(rollout.rows(c), p)[0] for c in chunks])  # (N, R)
        if policy.reference is not None:
            ref_logprobs = reference_answer_logprobs(policy.reference, rollout, options.temperature, micro)
    return GRPOBatch(
        run, policy, rollout, sampled.mask, advantages.to(run.device), old_logprobs, ref_logprobs
    )


@dataclass
class GRPOBatch:
    """One step's completions as GRPO's updates read them (`tunelab.rl.updates.RolloutBatch`)."""

    run: Run
    policy: Policy
    rollout: Rollout
    mask: torch.Tensor
    """(N, R) the completion tokens."""
    advantages: torch.Tensor
    """(N,) each completion's group advantage."""
    old_logprobs: torch.Tensor | None
    """(N, R) log pi_old at sampling time, when samples are reused; else pi itself, detached."""
    ref_logprobs: torch.Tensor | None
    """(N, R) log pi_ref, when beta > 0."""

    @property
    def size(self) -> int:
        return len(self.mask)

    def normaliser(self, rows: torch.Tensor) -> tuple[float, float]:
        """(units, tokens) of global mini-batch `rows`; units: sequences, tokens or sequences x L, as
        `loss_aggregation` says."""
        options, mask = self.policy.options, self.mask[rows]
        _, local_units = aggregate_loss(mask, mask, options.loss_aggregation, options.max_new_tokens)
        units, tokens = self.run.dist.sum(local_units, float(mask.sum()))
        return units, max(tokens, 1.0)

    def loss(
        self, chunk: torch.Tensor, normaliser: tuple[float, float]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The GRPO loss of the rows `chunk` (their aggregated sum / the mini-batch's units) and the
        logged parts (the loss; clip fraction, entropy, k3 per token of the mini-batch)."""
        units, tokens = normaliser
        options = self.policy.options
        logprobs, entropy = self.policy.logprobs(self.rollout.rows(chunk), self.rollout.prompt_length, True)
        logprobs = logprobs.float()
        old = self.old_logprobs[chunk] if self.old_logprobs is not None else logprobs.detach()
        ref = self.ref_logprobs[chunk] if self.ref_logprobs is not None else None
        per_token, clipped = grpo_per_token_loss(
            logprobs, old, self.advantages[chunk], options.epsilon, options.epsilon_high, ref, options.beta
        )
        mask = self.mask[chunk]
        loss_sum, _ = aggregate_loss(per_token, mask, options.loss_aggregation, options.max_new_tokens)
        loss = loss_sum / units
        parts = {
            "loss": float(loss.detach()),
            "clip_frac": float((clipped * mask).sum()) / tokens,
            "entropy": float((entropy * mask).sum()) / tokens,
        }
        if ref is not None:
            parts["kl"] = float((kl_k3(logprobs.detach(), ref) * mask).sum()) / tokens
        return loss, parts

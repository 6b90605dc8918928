"""PPO from feedback: sample responses, score them, and improve the policy with clipped updates.

Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences"), Ouyang et al. 2022,
with the details of Huang et al. 2024 ("The N+ Implementation Details of RLHF with PPO"). Each step:

1. rollouts: one response per prompt, sampled at temperature tau / top-p, at most
   `max_new_tokens`, stopping at EOS (tunelab/rl/rollouts.py);
2. score s: a trained reward model and/or Python reward functions (tunelab/rl/rewards.py), minus
   `missing_eos_penalty` for a response cut before EOS; normalised over the batch to mean 0 and
   std 1 (`whiten_scores`: the value head starts at 0 and a reward model's scale is arbitrary);
3. per-token rewards r_t = -kl_coef * KL_t (+ s at the last token), KL_t an estimate (k1 by default)
   of log pi_old / pi_ref against the reference policy (the method disabled, or a frozen copy);
4. values V_t from a value head on the policy's own hidden states (zero-initialised, trains in
   full), GAE advantages A_t (gamma, lambda) and returns R_t = A_t + V_t; A whitened over the batch;
5. `ppo_epochs` passes over the rollouts in `num_mini_batches` mini-batches, one optimizer step each:

       L = mean_tokens[ max(-A rho, -A clip(rho, 1 +- eps)) ] + vf_coef * mean_tokens[ 1/2 max((V - R)^2, (V_clip - R)^2) ]

   rho = pi / pi_old per token; a mini-batch may be split into `train.grad_accum` micro-batches
   (the token mean is taken over the whole mini-batch, so the step is the same).

Logged per step: reward, kl (per response, summed over tokens), entropy, clip_frac, value_loss,
response_length, eos_fraction. `train.batch_size` prompts per step; `train.max_steps` steps (or
`train.epochs` passes over the prompts). The value head is not saved: `final/` holds the policy.

Under torchrun each of W ranks takes `train.batch_size` prompts of a global batch of W times as
many; rollouts are sampled with keys (tunelab/rl/rollouts.py), and the score and advantage
whitening, the token means of the losses and every logged figure are taken over the global batch,
so W ranks x b prompts take the step of one process x W * b (up to floating-point order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedModel

from tunelab.config import RunConfig
from tunelab.logprobs import final_hidden
from tunelab.losses.kl import per_token_kl
from tunelab.losses.ppo import approx_policy_kl, clipped_policy_loss, clipped_value_loss
from tunelab.reference import Reference
from tunelab.rl.advantages import gae, masked_mean, masked_var, masked_whiten, token_rewards
from tunelab.rl.online import OnlineOptions, OnlineRun, PromptBatch, Sampled
from tunelab.rl.policy import answer_logprobs, reference_answer_logprobs
from tunelab.rl.reward_model import VALUE_HEAD, attach_head, detach_head, token_values
from tunelab.rl.rollouts import Rollout
from tunelab.rl.updates import policy_updates, split
from tunelab.training.loop import StepLoop, resume
from tunelab.training.optim import build_optimizer
from tunelab.training.setup import Run


@dataclass
class Options(OnlineOptions):
    """PPO's options, after the options it shares with GRPO (tunelab/rl/online.py)."""

    ppo_epochs: int = 4
    """Passes over each batch of rollouts."""
    clip_range: float = 0.2
    """eps of the clipped policy ratio 1 +- eps."""
    value_clip_range: float = 0.2
    """eps_v: how far a value prediction may move from its rollout-time value before clipping."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    gamma: float = 1.0
    """Discount of GAE."""
    lam: float = 0.95
    """lambda of GAE (1 = Monte-Carlo returns, 0 = one-step TD)."""
    kl_coef: float = 0.05
    """Weight of the per-token KL penalty to the reference policy in the rewards."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """KL estimator of the penalty (tunelab/losses/kl.py)."""
    whiten_scores: bool = True
    """Normalise each batch's scores to mean 0, std 1 before the KL penalty is added: a reward
    model's scale is arbitrary and the value head starts at 0 (logged `reward` stays unnormalised)."""
    whiten_advantages: bool = True
    """Normalise the advantages of each batch to mean 0, variance 1."""
    missing_eos_penalty: float | None = None
    """Subtract this from the score of a response cut at max_new_tokens without EOS."""

    def __post_init__(self):
        super().__post_init__()
        if self.ppo_epochs < 1:
            raise ValueError(f"ppo_epochs must be at least 1, not {self.ppo_epochs}")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ValueError("gamma and lam must be in [0, 1]")
        if self.clip_range <= 0 or self.value_clip_range <= 0 or self.kl_coef < 0 or self.vf_coef < 0:
            raise ValueError("clip_range and value_clip_range must be > 0; kl_coef and vf_coef >= 0")


def run(config: RunConfig) -> dict:
    """Train a policy with PPO; returns the summary written to `summary.json`."""
    # Set-up: the policy with its method, the prompts and rewards, the reference, the value head.
    options = config.objective.options
    online = OnlineRun.setup(config, answer="response")
    run, model = online.run, online.run.model
    reference = Reference(model, run.method, run.dist.frozen_copy, run.start)
    value_head = attach_head(model, VALUE_HEAD, zero_init=True)
    run.print(f"[tunelab] rewards: {', '.join(online.rewards.names)}; reference policy: {reference.kind}")
    policy = Policy(model, value_head, reference, options)
    evaluate = online.evaluate if online.data.eval else None
    # DDP or FSDP2 under torchrun (the head and the reference copy come first; under FSDP each rank
    # reads its shard of the weights here, so the held-out figures come after it).
    run.dist.wrap(model)
    before = evaluate() if evaluate else {}
    steps = online.steps()
    optimizer = build_optimizer(model, config.train)
    start = resume(run, optimizer)
    prompt_batches = online.prompt_batches(position=start)

    # The loop: each step samples answers to a batch of prompts, scores them and learns from them.
    loop = StepLoop(run, optimizer, steps, start, evaluate, desc="rl")
    with loop.running():
        for step in loop.step_numbers():
            loop.end_step(step, ppo_step(online, policy, optimizer, step, next(prompt_batches)), step)

    # The end: `final/` (the policy, without the value head), then held-out scores, `summary.json`.
    detach_head(model, VALUE_HEAD)
    reference.copy = None  # the held-out scores need no reference: free a frozen copy before saving
    return online.finish(loop.result(), before, last_keys=("kl",))


@dataclass
class Policy:
    """What PPO trains and compares with: the policy, its value head, the frozen reference."""

    model: PreTrainedModel
    value_head: nn.Linear
    reference: Reference
    options: Options

    def forward(self, rows: dict, prompt_length: int, with_entropy: bool = False):
        """Answer-aligned (logprobs, entropy or None, values), each (n, R), of some rollout rows."""
        hidden = final_hidden(self.model, rows["input_ids"], rows["attention_mask"])  # (n, P+R, H)
        temperature = self.options.temperature
        logprobs, entropy = answer_logprobs(
            self.model, hidden, rows, prompt_length, temperature, with_entropy
        )
        values = token_values(self.value_head, hidden)  # (n, P+R): V of the state before each token
        return logprobs, entropy, values[:, prompt_length - 1 : -1]


def ppo_step(online: OnlineRun, policy: Policy, optimizer, step: int, prompt_batch: PromptBatch) -> dict:
    """Steps 1-5 of the module docstring on one batch of prompts; returns the step's figures."""
    run, options = online.run, policy.options
    positions, prompts = prompt_batch
    sampled = online.sample_and_score(prompts, step, positions)  # 1-2. keyed: the same whatever the rank
    penalised, scores = shaped_scores(run, sampled, options)  # 2.
    batch = ppo_batch(run, policy, sampled.rollout, sampled.mask, scores)  # 3-4.
    micro = max(1, run.config.train.grad_accum)
    figures = policy_updates(run, optimizer, batch, options.ppo_epochs, options.num_mini_batches, micro)  # 5.
    sums = {
        "reward": penalised.sum(),
        "kl": batch.kl.sum(),
        "response_length": batch.mask.sum(),
        "eos_fraction": sampled.rollout.ended.float().sum(),
        **{f"reward/{name}": values.sum() for name, values in sampled.parts.items()},
    }
    figures.update(online.global_means(sums, sampled.size))  # figures of the global batch
    figures["entropy"] = float(masked_mean(batch.entropy, batch.mask, all_sum=run.dist.all_sum))
    return figures


def shaped_scores(run: Run, sampled: Sampled, options: Options) -> tuple[torch.Tensor, torch.Tensor]:
    """(the scores minus `missing_eos_penalty` for answers cut before EOS, logged as `reward`; those
    whitened over the global batch (`whiten_scores`), which the rewards use), each (N,)."""
    scores = sampled.scores.to(run.device)
    if options.missing_eos_penalty:
        scores = scores - options.missing_eos_penalty * (~sampled.rollout.ended.to(run.device)).float()
    penalised, every, total = scores, torch.ones_like(scores), run.dist.all_sum
    if options.whiten_scores and float(total(every.sum())) > 1:
        mean = masked_mean(scores, every, all_sum=total)
        std = masked_var(scores, every, all_sum=total).sqrt()
        scores = (scores - mean) / (std + 1e-8)  # the value head's scale
    return penalised, scores


@torch.no_grad()
def ppo_batch(run: Run, policy: Policy, rollout: Rollout, mask: torch.Tensor, scores: torch.Tensor):
    """Steps 3-4: log-probs, values and reference log-probs at rollout time, per-token rewards with
    the KL penalty, GAE advantages and returns: the `PPOBatch` the updates read."""
    options, total = policy.options, run.dist.all_sum
    p, micro = rollout.prompt_length, max(1, run.config.train.grad_accum)
    old_logprobs, old_values, entropy = [], [], []
    with run.autocast():
        for chunk in split(torch.arange(len(scores)), micro):
            logprobs, chunk_entropy, values = policy.forward(rollout.rows(chunk), p, with_entropy=True)
            old_logprobs.append(logprobs.float())
            entropy.append(chunk_entropy)
            old_values.append(values.float())
        ref_logprobs = reference_answer_logprobs(policy.reference, rollout, options.temperature, micro)
    old_logprobs, old_values = torch.cat(old_logprobs), torch.cat(old_values) * mask  # (N, R)
    kl = per_token_kl(old_logprobs, ref_logprobs, options.kl_estimator) * mask  # (N, R)
    rewards = token_rewards(scores, kl, mask, options.kl_coef)  # (N, R)
    advantages, returns = gae(rewards, old_values, mask, options.gamma, options.lam)
    if options.whiten_advantages:
        advantages = masked_whiten(advantages, mask, all_sum=total)
    return PPOBatch(
        run, policy, rollout, mask, old_logprobs, old_values, advantages, returns, torch.cat(entropy), kl
    )


@dataclass
class PPOBatch:
    """One step's rollouts as PPO's updates read them (`tunelab.rl.updates.RolloutBatch`); every
    tensor (N, R), aligned with the answers."""

    run: Run
    policy: Policy
    rollout: Rollout
    mask: torch.Tensor
    old_logprobs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    entropy: torch.Tensor
    kl: torch.Tensor

    @property
    def size(self) -> int:
        return len(self.mask)

    def normaliser(self, rows: torch.Tensor) -> torch.Tensor:
        """The answer tokens of global mini-batch `rows` (token means over the whole mini-batch)."""
        return self.run.dist.all_sum(self.mask[rows].sum()).clamp(min=1.0)

    def loss(self, chunk: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """PPO's loss of the rows `chunk`, summed over their tokens / the mini-batch's `tokens`, and
        its parts (each a sum over the chunk's tokens / `tokens`)."""
        options = self.policy.options
        logprobs, _, values = self.policy.forward(self.rollout.rows(chunk), self.rollout.prompt_length)
        pg, pg_clipped = clipped_policy_loss(
            logprobs.float(), self.old_logprobs[chunk], self.advantages[chunk], options.clip_range
        )
        vf, vf_clipped = clipped_value_loss(
            values.float(), self.old_values[chunk], self.returns[chunk], options.value_clip_range
        )
        mask = self.mask[chunk]
        loss = ((pg + options.vf_coef * vf) * mask).sum() / tokens
        parts = {
            "loss": pg + options.vf_coef * vf,
            "policy_loss": pg,
            "value_loss": vf,
            "clip_frac": pg_clipped,
            "value_clip_frac": vf_clipped,
            "approx_kl": approx_policy_kl(logprobs.detach().float(), self.old_logprobs[chunk]),
        }
        return loss, {key: float((value.detach() * mask).sum() / tokens) for key, value in parts.items()}

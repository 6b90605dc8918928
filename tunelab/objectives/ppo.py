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

from dataclasses import dataclass, field
from typing import Literal

import torch

from tunelab.config import RunConfig
from tunelab.logprobs import final_hidden, logprobs_from_hidden
from tunelab.losses.kl import per_token_kl
from tunelab.losses.ppo import approx_policy_kl, clipped_policy_loss, clipped_value_loss
from tunelab.reference import Reference, reference_logprobs
from tunelab.rl.advantages import gae, masked_mean, masked_var, masked_whiten, token_rewards
from tunelab.rl.loop import online_loop
from tunelab.rl.online import OnlineRun, PromptBatch, policy_updates, split
from tunelab.rl.reward_model import VALUE_HEAD, attach_head, detach_head, token_values
from tunelab.rl.rewards import check_reward_spec


@dataclass
class Options:
    reward_model: str | None = None
    """A reward model trained with `objective: reward` (its run folder or `final/`); same tokenizer."""
    reward_functions: list[str] = field(default_factory=list)
    """Python reward functions, `package.module:function` or `path/file.py:function` (see tunelab/rl/rewards.py)."""
    reward_weights: list[float] | None = None
    """Weight of each reward function (default 1 each); the reward model's weight is 1."""
    max_new_tokens: int = 64
    """Longest response sampled."""
    temperature: float = 1.0
    """Sampling temperature tau; the log-probs are those of the tempered policy."""
    top_p: float = 1.0
    """Nucleus sampling: sample from the smallest token set holding this much probability."""
    ppo_epochs: int = 4
    """Passes over each batch of rollouts."""
    num_mini_batches: int = 1
    """Optimizer steps per pass: the rollouts are split into this many mini-batches."""
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
        check_reward_spec(self.reward_functions, self.reward_weights, self.reward_model)
        for name in ("max_new_tokens", "ppo_epochs", "num_mini_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be > 0 and top_p in (0, 1]")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ValueError("gamma and lam must be in [0, 1]")
        if self.clip_range <= 0 or self.value_clip_range <= 0 or self.kl_coef < 0 or self.vf_coef < 0:
            raise ValueError("clip_range and value_clip_range must be > 0; kl_coef and vf_coef >= 0")


def run(config: RunConfig) -> dict:
    """Train a policy with PPO; returns the summary written to `summary.json`."""
    cfg, options = config, config.objective.options
    online = OnlineRun.setup(cfg, answer="response")
    run_, model = online.run, online.run.model
    reference = Reference(model, run_.method, run_.dist.frozen_copy)
    value_head = attach_head(model, VALUE_HEAD, zero_init=True)
    run_.print(f"[tunelab] rewards: {', '.join(online.rewards.names)}; reference policy: {reference.kind}")
    micro = max(1, cfg.train.grad_accum)
    total = run_.dist.all_sum  # a tensor summed over ranks

    def policy_forward(rows: dict, prompt_length: int, with_entropy: bool = False):
        """Response-aligned (logprobs, entropy, values), each (n, R), of some rollout rows."""
        hidden = final_hidden(model, rows["input_ids"], rows["attention_mask"])  # (n, P+R, H)
        logprobs, entropy = logprobs_from_hidden(
            model, hidden, rows["input_ids"], rows["target_mask"], options.temperature, with_entropy
        )
        values = token_values(value_head, hidden)  # (n, P+R)
        p = prompt_length
        return logprobs[:, p:], entropy[:, p:] if with_entropy else None, values[:, p - 1 : -1]

    def chunk_loss(rows: dict, p: int, chunk, tokens, old_logprobs, old_values, advantages, returns, mask):
        """PPO's loss of some rows (summed over their tokens / the mini-batch's `tokens`) and its parts."""
        logprobs, _, values = policy_forward(rows, p)  # (n, R) each
        pg, pg_clipped = clipped_policy_loss(
            logprobs.float(), old_logprobs[chunk], advantages[chunk], options.clip_range
        )
        vf, vf_clipped = clipped_value_loss(
            values.float(), old_values[chunk], returns[chunk], options.value_clip_range
        )
        m = mask[chunk]
        loss = ((pg + options.vf_coef * vf) * m).sum() / tokens
        parts = {
            "loss": pg + options.vf_coef * vf,
            "policy_loss": pg,
            "value_loss": vf,
            "clip_frac": pg_clipped,
            "value_clip_frac": vf_clipped,
            "approx_kl": approx_policy_kl(logprobs.detach().float(), old_logprobs[chunk]),
        }
        return loss, {key: float((value.detach() * m).sum() / tokens) for key, value in parts.items()}

    def step_fn(step: int, batch: PromptBatch, optimizer) -> dict:
        positions, prompts = batch
        # 1-2. Rollouts (keyed: the same whatever the rank) and their scores.
        rollout = online.sample(prompts, step, positions)
        p, n = rollout.prompt_length, len(prompts)
        mask = rollout.response_mask.to(run_.device)  # (N, R)
        scores, parts = online.score(prompts, rollout)
        scores = scores.to(run_.device)
        ended = rollout.ended.to(run_.device)
        if options.missing_eos_penalty:
            scores = scores - options.missing_eos_penalty * (~ended).float()
        raw_scores = scores
        every = torch.ones_like(scores)
        if options.whiten_scores and float(total(every.sum())) > 1:
            mean = masked_mean(scores, every, all_sum=total)  # over the global batch
            std = masked_var(scores, every, all_sum=total).sqrt()
            scores = (scores - mean) / (std + 1e-8)  # (N,), the value head's scale

        # 3-4. Log-probs, values and reference log-probs at rollout time; rewards, advantages.
        old_logprobs, old_values, entropy, ref_logprobs = [], [], [], []
        with torch.no_grad(), run_.autocast():
            for chunk in split(torch.arange(n), micro):
                rows = rollout.rows(chunk)
                logprobs, chunk_entropy, values = policy_forward(rows, p, with_entropy=True)
                old_logprobs.append(logprobs.float())
                entropy.append(chunk_entropy)
                old_values.append(values.float())
                ref = reference_logprobs(reference, **rows, temperature=options.temperature)
                ref_logprobs.append(ref[:, p:])
        old_logprobs, old_values = torch.cat(old_logprobs), torch.cat(old_values) * mask  # (N, R)
        entropy, ref_logprobs = torch.cat(entropy), torch.cat(ref_logprobs)
        kl = per_token_kl(old_logprobs, ref_logprobs, options.kl_estimator) * mask  # (N, R)
        rewards_t = token_rewards(scores, kl, mask, options.kl_coef)  # (N, R)
        advantages, returns = gae(rewards_t, old_values, mask, options.gamma, options.lam)
        if options.whiten_advantages:
            advantages = masked_whiten(advantages, mask, all_sum=total)

        # 5. PPO epochs over mini-batches (token means over each global mini-batch), in micro-batches.
        tensors = (old_logprobs, old_values, advantages, returns, mask)
        row = policy_updates(
            run_,
            optimizer,
            n,
            options.ppo_epochs,
            options.num_mini_batches,
            micro,
            normaliser=lambda rows: total(mask[rows].sum()).clamp(min=1.0),
            chunk_loss=lambda chunk, tokens: chunk_loss(rollout.rows(chunk), p, chunk, tokens, *tensors),
        )

        # Figures of the global batch: sums over ranks / rollouts.
        local = {
            "reward": raw_scores.sum(),
            "kl": kl.sum(),
            "response_length": mask.sum(),
            "eos_fraction": ended.float().sum(),
            **{f"reward/{name}": values.sum() for name, values in parts.items()},
        }
        count, *values = run_.dist.sum(n, *(float(v) for v in local.values()))
        row.update({key: value / count for key, value in zip(local, values, strict=True)})
        row["entropy"] = float(masked_mean(entropy, mask, all_sum=total))
        return row

    before = online.evaluate() if online.data.eval else {}
    evaluate = online.evaluate if online.data.eval else None
    result = online_loop(run_, online.prompt_batches, step_fn, online.steps(), evaluate)
    detach_head(model, VALUE_HEAD)
    reference.copy = None
    return online.finish(result, before, last_keys=("kl",))

"""RLHF losses against hand-derived values and against TRL 1.16.0 on the same tensors.

TRL's losses live inside its trainers' `compute_loss` methods. Where that method is a pure function
of its inputs we run TRL's own code with a stand-in `self` (no model, no accelerator): the reward
trainer's `compute_loss`, `DPOTrainer._compute_loss` and `GRPOTrainer._compute_loss`. TRL 1.16 has
no PPO trainer (it was removed after 0.2x), so the PPO pieces (masked whitening, GAE, the clipped
policy and value losses) are compared with TRL's formulas copied from its last PPO trainer
(`trl/trainer/ppo_trainer.py` and `trl/trainer/utils.py`, TRL 0.19), quoted in `trl_*` below.
"""

from __future__ import annotations

import inspect
import math
import textwrap
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from trl.trainer import utils as trl_utils

from tunelab.losses.dpo import dpo_loss
from tunelab.losses.grpo import aggregate_loss, grpo_per_token_loss
from tunelab.losses.kl import kl_k1, kl_k2, kl_k3, per_token_kl
from tunelab.losses.ppo import clipped_policy_loss, clipped_value_loss
from tunelab.losses.reward import bradley_terry_loss, pairwise_accuracy
from tunelab.rl.advantages import gae, group_advantages, masked_mean, masked_whiten, token_rewards

# ------------------------------------------------------------------ stand-ins for TRL's trainer `self`


class Accelerator:
    """Single process: gather and reduce are the identity."""

    device = torch.device("cpu")
    num_processes = 1

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def metrics():
    return defaultdict(lambda: defaultdict(list))


def trl_reward_loss(chosen, rejected, margin=None, center=None):
    """TRL's `RewardTrainer.compute_loss` on rewards (2B, 1) = [chosen; rejected]."""
    from trl.trainer.reward_trainer import RewardTrainer

    outputs = SimpleNamespace(logits=torch.cat([chosen, rejected]).unsqueeze(-1))
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=Accelerator(),
        args=SimpleNamespace(center_rewards_coefficient=center),
        _metrics=metrics(),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {"attention_mask": torch.ones(2 * len(chosen), 3, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = margin
    loss = RewardTrainer.compute_loss(trainer, lambda **kw: outputs, inputs)
    return loss, trainer._metrics["train"]


def trl_dpo_loss(pc, pr, rc, rr, beta, loss_type="sigmoid", label_smoothing=0.0):
    """TRL's `DPOTrainer._compute_loss` with precomputed reference log-probs.

    Each sequence has one completion token whose log-prob is the pair's summed log-prob, so TRL's
    sum over the sequence gives exactly the inputs.
    """
    n = 2 * len(pc)
    log_probs = torch.stack([torch.cat([pc, pr]), torch.zeros(n)], dim=1)  # (2B, T-1), T = 3
    completion_mask = torch.tensor([[0, 1, 0]] * n)
    return trl_dpo_compute_loss(log_probs, completion_mask, rc, rr, beta, loss_type, label_smoothing)


def trl_dpo_compute_loss(log_probs, completion_mask, rc, rr, beta, loss_type, label_smoothing=0.0):
    """TRL's `DPOTrainer._compute_loss` on the policy's per-token log-probs (2B, T-1) (chosen rows
    first), a completion mask (2B, T) and precomputed reference log-probs rc, rr (B,): (loss, metrics)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    n, width = completion_mask.shape
    outputs = SimpleNamespace(
        log_probs=log_probs,
        entropy=torch.zeros(n, width - 1),
        mean_logits=torch.zeros(n, width - 1),
        is_top1=torch.zeros(n, width - 1, dtype=torch.bool),
    )
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=Accelerator(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics=metrics(),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(n, width, dtype=torch.long),
        "attention_mask": torch.ones(n, width, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    loss = DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, return_outputs=False)
    return loss, trainer._metrics["train"]


def trl_grpo_loss(logps, old, ref, advantages, mask, loss_type, beta, eps_low, eps_high, max_len=None):
    """TRL's `GRPOTrainer._compute_loss`; the model's per-token log-probs are `logps`."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    entropies = torch.zeros_like(logps)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=Accelerator(),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, entropies, None),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        loss_type=loss_type,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        current_gradient_accumulation_steps=1,
        max_completion_length=max_len,
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        _metrics=metrics(),
    )
    inputs = {
        "prompt_ids": torch.zeros(len(logps), 1, dtype=torch.long),
        "prompt_mask": torch.ones(len(logps), 1, dtype=torch.long),
        "completion_ids": torch.zeros_like(mask, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),
    }
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss, trainer._metrics["train"]


# TRL 0.19 trl/trainer/utils.py (removed in TRL 1.x), verbatim but for line breaks.
def trl_masked_mean(values, mask, axis=None):
    if axis is not None:
        return (values * mask).sum(axis=axis) / mask.sum(axis=axis)
    return (values * mask).sum() / mask.sum()


def trl_masked_var(values, mask, unbiased=True):
    mean = trl_masked_mean(values, mask)
    centered_values = values - mean
    variance = trl_masked_mean(centered_values**2, mask)
    if unbiased:
        mask_sum = mask.sum()
        bessel_correction = mask_sum / (mask_sum - 1)
        variance = variance * bessel_correction
    return variance


def trl_masked_whiten(values, mask, shift_mean=True):
    mean, var = trl_masked_mean(values, mask), trl_masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def trl_gae(rewards, values, gamma, lam):
    """TRL 0.19 `PPOTrainer.train`, step 6 (rewards and values already zero on padding)."""
    lastgaelam = 0
    advantages_reversed = []
    gen_length = rewards.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    return advantages, advantages + values


def trl_ppo_losses(
    new_logprobs, logprobs, advantages, vpred, values, returns, mask, cliprange, cliprange_value
):
    """TRL 0.19 `PPOTrainer.train`, the mini-batch loss (one mask for policy and value here)."""
    vpredclipped = torch.clamp(vpred, values - cliprange_value, values + cliprange_value)
    vf_losses1 = torch.square(vpred - returns)
    vf_losses2 = torch.square(vpredclipped - returns)
    vf_loss_max = torch.max(vf_losses1, vf_losses2)
    vf_loss = 0.5 * trl_masked_mean(vf_loss_max, mask)
    vf_clipfrac = trl_masked_mean((vf_losses2 > vf_losses1).float(), mask)
    ratio = torch.exp(new_logprobs - logprobs)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss_max = torch.max(pg_losses, pg_losses2)
    pg_loss = trl_masked_mean(pg_loss_max, mask)
    pg_clipfrac = trl_masked_mean((pg_losses2 > pg_losses).float(), mask)
    return pg_loss, vf_loss, pg_clipfrac, vf_clipfrac


def random_batch(seed=0, batch=6, length=7):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, length + 1, (batch,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).float()  # (B, T), prefixes
    logps = -torch.rand(batch, length, generator=gen) * 3
    old = logps + 0.3 * torch.randn(batch, length, generator=gen)
    ref = logps + 0.5 * torch.randn(batch, length, generator=gen)
    return gen, mask, logps, old, ref


# ------------------------------------------------------------------ reward model (Bradley-Terry)


def test_bradley_terry_by_hand():
    """r_c = 2, r_r = 1: -log sigma(1) = log(1 + e^-1) = 0.31326; with margin 1: log 2 = 0.69315;
    centring with c = 0.5 adds 0.5 (2 + 1)^2 = 4.5."""
    chosen, rejected = torch.tensor([2.0]), torch.tensor([1.0])
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    assert bradley_terry_loss(chosen, rejected, torch.tensor([1.0])).item() == pytest.approx(
        math.log(2), abs=1e-6
    )
    centred = bradley_terry_loss(chosen, rejected, center_coefficient=0.5).item()
    assert centred == pytest.approx(math.log(1 + math.exp(-1)) + 4.5, abs=1e-6)
    assert pairwise_accuracy(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])).tolist() == [1.0, 0.0]


@pytest.mark.parametrize(("with_margin", "center"), [(False, None), (True, None), (False, 0.01), (True, 0.1)])
def test_bradley_terry_matches_trl(with_margin, center):
    gen = torch.Generator().manual_seed(1)
    chosen, rejected = torch.randn(8, generator=gen), torch.randn(8, generator=gen)
    margin = torch.rand(8, generator=gen) if with_margin else None
    expected, logged = trl_reward_loss(chosen, rejected, margin, center)
    ours = bradley_terry_loss(chosen, rejected, margin, center or 0.0).mean()
    assert ours.item() == pytest.approx(expected.item(), abs=1e-6)
    assert pairwise_accuracy(chosen, rejected).mean().item() == pytest.approx(logged["accuracy"][0])


# ------------------------------------------------------------------ DPO


def test_dpo_by_hand():
    """pi_c = -1, pi_r = -2, ref_c = ref_r = -1.5, beta = 0.1: Delta = 0.5 - (-0.5) = 1,
    L = -log sigma(0.1) = log(1 + e^-0.1) = 0.64440; rewards 0.05 and -0.05.
    cDPO with eps = 0.2: 0.8 * 0.64440 + 0.2 * log(1 + e^0.1) = 0.51552 + 0.14888 = 0.66440."""
    args = [torch.tensor([x]) for x in (-1.0, -2.0, -1.5, -1.5)]
    loss, chosen, rejected = dpo_loss(*args, beta=0.1)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.1)), abs=1e-6)
    assert (chosen.item(), rejected.item()) == pytest.approx((0.05, -0.05))
    smoothed, _, _ = dpo_loss(*args, beta=0.1, label_smoothing=0.2)
    expected = 0.8 * math.log(1 + math.exp(-0.1)) + 0.2 * math.log(1 + math.exp(0.1))
    assert smoothed.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_matches_trl(beta):
    gen = torch.Generator().manual_seed(2)
    pc, pr, rc, rr = (-5 * torch.rand(6, generator=gen) for _ in range(4))
    expected, logged = trl_dpo_loss(pc, pr, rc, rr, beta)
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta)
    assert losses.mean().item() == pytest.approx(expected.item(), abs=1e-6)
    assert chosen.mean().item() == pytest.approx(logged["rewards/chosen"][0], abs=1e-6)
    assert rejected.mean().item() == pytest.approx(logged["rewards/rejected"][0], abs=1e-6)
    assert (chosen - rejected).mean().item() == pytest.approx(logged["rewards/margins"][0], abs=1e-6)
    assert (chosen > rejected).float().mean().item() == pytest.approx(logged["rewards/accuracies"][0])


def test_conservative_dpo_matches_trl():
    """TRL 1.16's `sigmoid` loss dropped label smoothing; its `aot` loss sorts the batch's log-ratios
    and then applies -(1-eps) log sigma(beta d) - eps log sigma(-beta d). For one pair the sort is
    the identity and `aot` is exactly conservative DPO, so we compare pair by pair."""
    gen = torch.Generator().manual_seed(3)
    pc, pr, rc, rr = (-5 * torch.rand(5, generator=gen) for _ in range(4))
    ours, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.3, label_smoothing=0.15)
    for i in range(5):
        pair = [t[i : i + 1] for t in (pc, pr, rc, rr)]
        expected, _ = trl_dpo_loss(*pair, beta=0.3, loss_type="aot", label_smoothing=0.15)
        assert ours[i].item() == pytest.approx(expected.item(), abs=1e-6)


# ------------------------------------------------------------------ KL estimators


def test_kl_estimators_by_hand():
    """log pi = -1, log pi_ref = -2: log r = -1, k1 = 1, k2 = 1/2, k3 = e^-1 + 1 - 1 = 0.36788."""
    logp, ref = torch.tensor([[-1.0]]), torch.tensor([[-2.0]])
    assert kl_k1(logp, ref).item() == pytest.approx(1.0)
    assert kl_k2(logp, ref).item() == pytest.approx(0.5)
    assert kl_k3(logp, ref).item() == pytest.approx(math.exp(-1), abs=1e-6)
    assert per_token_kl(logp, ref, "k3").item() == pytest.approx(math.exp(-1), abs=1e-6)
    with pytest.raises(ValueError, match="unknown KL estimator"):
        per_token_kl(logp, ref, "k4")


def test_kl_estimators_are_exact_in_expectation():
    """Over a whole vocabulary, E_pi[k1] = E_pi[k3] = KL(pi || pi_ref) exactly; k2 is close for
    nearby distributions (its bias is third order in the log-ratio)."""
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(50, generator=gen)
    logp = F.log_softmax(logits, -1)
    ref = F.log_softmax(logits + 0.1 * torch.randn(50, generator=gen), -1)
    kl = F.kl_div(ref, logp, log_target=True, reduction="sum")  # KL(pi || pi_ref)
    p = logp.exp()
    assert (p * kl_k1(logp, ref)).sum().item() == pytest.approx(kl.item(), rel=1e-4)
    assert (p * kl_k3(logp, ref)).sum().item() == pytest.approx(kl.item(), rel=1e-4)
    assert (p * kl_k2(logp, ref)).sum().item() == pytest.approx(kl.item(), rel=0.1)


def trl_rloo_kl_penalty(old, ref, mask, rewards, beta):
    """TRL's `RLOOTrainer` KL penalty, run from TRL's own source: the lines of
    `_generate_and_score_completions` from `per_token_kl = ...` to `rewards = rewards - self.beta * kl`
    (in TRL 1.16: per_token_kl = old - ref (k1), summed over the completion, subtracted from the
    rewards), executed on our tensors. Returns (per_token_kl, penalised rewards)."""
    from trl.trainer.rloo_trainer import RLOOTrainer

    lines = inspect.getsource(RLOOTrainer._generate_and_score_completions).splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("per_token_kl = "))
    end = next(
        i for i in range(start, len(lines)) if lines[i].strip() == "rewards = rewards - self.beta * kl"
    )
    namespace = {
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "completion_mask": mask,
        "rewards": rewards,
        "gather": lambda x: x,  # one process
        "self": SimpleNamespace(beta=beta),
    }
    exec(textwrap.dedent("\n".join(lines[start : end + 1])), namespace)
    return namespace["per_token_kl"], namespace["rewards"]


def test_k3_matches_trl_grpo_and_k1_matches_trl_rloo():
    _, mask, logps, old, ref = random_batch(5)
    _, logged = trl_grpo_loss(logps, logps, ref, torch.zeros(len(logps)), mask, "grpo", 0.04, 0.2, 0.2)
    assert masked_mean(kl_k3(logps, ref), mask).item() == pytest.approx(logged["kl"][0], abs=1e-6)
    # TRL 1.16 RLOOTrainer's own lines: k1 per token, summed over the completion into the penalty.
    scores = torch.randn(len(old), generator=torch.Generator().manual_seed(8))
    trl_kl, trl_rewards = trl_rloo_kl_penalty(old, ref, mask, scores.clone(), 0.05)
    torch.testing.assert_close(kl_k1(old, ref) * mask, trl_kl * mask)
    torch.testing.assert_close(scores - 0.05 * (per_token_kl(old, ref, "k1") * mask).sum(-1), trl_rewards)


# ------------------------------------------------------------------ PPO: whitening, rewards, GAE, losses


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_trl(shift_mean):
    gen, mask, values, _, _ = random_batch(6)
    ours = masked_whiten(values, mask, shift_mean=shift_mean)
    expected = trl_masked_whiten(values, mask, shift_mean=shift_mean) * mask  # TRL then zeroes padding
    torch.testing.assert_close(ours, expected)
    assert masked_mean(ours, mask).item() == pytest.approx(
        0.0 if shift_mean else masked_mean(values, mask).item(), abs=1e-5
    )


def test_token_rewards_by_hand():
    """scores (1, 2), kl_coef 0.1: row 0 (3 tokens) -> [-0.1 k, -0.1 k, -0.1 k + 1]; row 1 (1 token) -> [2 - 0.1 k]."""
    kl = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    rewards = token_rewards(torch.tensor([1.0, 2.0]), kl, mask, 0.1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.1, -0.2, 0.7], [1.6, 0.0, 0.0]]))


def test_gae_by_hand():
    """One response of 2 tokens, r = (0, 1), V = (0.5, 0.2), gamma = 0.9, lambda = 0.5:
    delta_1 = 1 - 0.2 = 0.8, A_1 = 0.8; delta_0 = 0 + 0.9 * 0.2 - 0.5 = -0.32,
    A_0 = -0.32 + 0.45 * 0.8 = 0.04; returns = A + V = (0.54, 1.0). The padding stays 0."""
    advantages, returns = gae(
        torch.tensor([[0.0, 1.0, 9.0]]), torch.tensor([[0.5, 0.2, 9.0]]), torch.tensor([[1, 1, 0]]), 0.9, 0.5
    )
    torch.testing.assert_close(advantages, torch.tensor([[0.04, 0.8, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.54, 1.0, 0.0]]))


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0)])
def test_gae_matches_trl(gamma, lam):
    gen, mask, _, _, _ = random_batch(7)
    rewards = torch.randn(mask.shape, generator=gen) * mask
    values = torch.randn(mask.shape, generator=gen) * mask
    ours = gae(rewards, values, mask, gamma, lam)
    expected = trl_gae(rewards, values, gamma, lam)
    torch.testing.assert_close(ours[0], expected[0] * mask)
    torch.testing.assert_close(ours[1], expected[1] * mask)


def test_ppo_losses_by_hand():
    """A = 1, rho = e^0.5 = 1.6487 > 1.2: the clipped term -1.2 is larger than -1.6487, so the loss
    is -1.2 and the token is clipped. A = -1, rho = 0.5 < 0.8: max(0.5, 0.8) = 0.8, clipped.
    Value: V_old = 0, V = 1, R = 0.5, eps 0.2: V_clip = 0.2, max(0.25, 0.09) / 2 = 0.125, unclipped."""
    loss, clipped = clipped_policy_loss(
        torch.tensor([[0.5, math.log(0.5)]]), torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), 0.2
    )
    torch.testing.assert_close(loss, torch.tensor([[-1.2, 0.8]]))
    assert clipped.tolist() == [[1.0, 1.0]]
    vloss, vclipped = clipped_value_loss(torch.tensor([[1.0]]), torch.zeros(1, 1), torch.tensor([[0.5]]), 0.2)
    assert vloss.item() == pytest.approx(0.125) and vclipped.item() == 0.0


def test_ppo_losses_match_trl():
    gen, mask, new, old, _ = random_batch(8)
    advantages = torch.randn(mask.shape, generator=gen)
    vpred, values, returns = (torch.randn(mask.shape, generator=gen) for _ in range(3))
    expected = trl_ppo_losses(new, old, advantages, vpred, values, returns, mask, 0.2, 0.3)
    pg, pg_clipped = clipped_policy_loss(new, old, advantages, 0.2)
    vf, vf_clipped = clipped_value_loss(vpred, values, returns, 0.3)
    ours = [masked_mean(t, mask) for t in (pg, vf, pg_clipped, vf_clipped)]
    for a, b in zip(ours, expected, strict=True):
        assert a.item() == pytest.approx(b.item(), abs=1e-6)
    assert 0 < ours[2].item() < 1  # some tokens clipped, not all


# ------------------------------------------------------------------ GRPO


def test_group_advantages_by_hand():
    """Group (0, 1, 1, 2): mean 1, std (Bessel) sqrt(2/3) = 0.8165 -> (-1.2247, 0, 0, 1.2247) up to
    eps; an all-equal group gives zeros; without scaling the result is r - mean."""
    rewards = torch.tensor([0.0, 1.0, 1.0, 2.0, 3.0, 3.0, 3.0, 3.0])
    ours = group_advantages(rewards, 4, eps=0.0)
    s = math.sqrt(1.5)
    torch.testing.assert_close(ours[:4], torch.tensor([-s, 0.0, 0.0, s]))
    torch.testing.assert_close(group_advantages(rewards, 4)[4:], torch.zeros(4))
    torch.testing.assert_close(
        group_advantages(rewards, 4, scale=False)[:4], torch.tensor([-1.0, 0.0, 0.0, 1.0])
    )


@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages_match_trl(scale):
    """TRL 1.16 `GRPOTrainer._generate_and_score_completions` (sum_then_normalize, scale_rewards
    "group" or "none"), with TRL's own `nanstd`."""
    gen = torch.Generator().manual_seed(9)
    rewards, g = torch.rand(12, generator=gen), 4
    mean_grouped = torch.nanmean(rewards.view(-1, g), dim=1).repeat_interleave(g, dim=0)
    std_grouped = trl_utils.nanstd(rewards.view(-1, g), dim=1).repeat_interleave(g, dim=0)
    expected = rewards - mean_grouped
    if scale:
        expected = expected / (std_grouped + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, g, scale=scale), expected)


def test_grpo_loss_by_hand():
    """Two completions, ratio 1 (old = new): l = -A per token. A = (1, -1), lengths 2 and 1:
    sequence: ((-1 - 1) / 2 + 1 / 1) / 2 = 0; token: (-1 - 1 + 1) / 3 = -1/3; constant (L = 4): -1/8.
    With beta = 0.1 and log pi_ref = log pi - 1 on every token, k3 = e^-1 + 1 - 1 = 0.36788 is added."""
    logps = torch.zeros(2, 2)
    mask = torch.tensor([[1, 1], [1, 0]])
    per_token, _ = grpo_per_token_loss(logps, logps, torch.tensor([1.0, -1.0]))
    for aggregation, expected in (("sequence", 0.0), ("token", -1 / 3), ("constant", -1 / 8)):
        total, units = aggregate_loss(per_token, mask, aggregation, max_completion_length=4)
        assert total.item() / units == pytest.approx(expected, abs=1e-6)
    with_kl, _ = grpo_per_token_loss(
        logps, logps, torch.tensor([1.0, -1.0]), ref_logprobs=logps - 1, beta=0.1
    )
    torch.testing.assert_close(with_kl - per_token, torch.full((2, 2), 0.1 * math.exp(-1)))


@pytest.mark.parametrize(
    ("aggregation", "trl_loss_type"),
    [("sequence", "grpo"), ("token", "bnpo"), ("token", "dapo"), ("constant", "dr_grpo")],
)
@pytest.mark.parametrize(("beta", "eps_high"), [(0.0, 0.2), (0.04, 0.28)])
def test_grpo_loss_matches_trl(aggregation, trl_loss_type, beta, eps_high):
    gen, mask, logps, old, ref = random_batch(10)
    advantages = torch.randn(len(logps), generator=gen)
    expected, logged = trl_grpo_loss(logps, old, ref, advantages, mask, trl_loss_type, beta, 0.2, eps_high, 7)
    per_token, clipped = grpo_per_token_loss(logps, old, advantages, 0.2, eps_high, ref, beta)
    total, units = aggregate_loss(per_token, mask, aggregation, max_completion_length=7)
    assert total.item() / units == pytest.approx(expected.item(), abs=1e-6)
    assert masked_mean(clipped, mask).item() == pytest.approx(logged["clip_ratio/region_mean"][0], abs=1e-6)


def test_grpo_aggregation_splits_exactly_into_micro_batches():
    """sum of micro-batch sums / sum of units = the loss of the whole batch, for every aggregation."""
    gen, mask, logps, old, ref = random_batch(11)
    per_token, _ = grpo_per_token_loss(
        logps, old, torch.randn(len(logps), generator=gen), 0.2, None, ref, 0.1
    )
    for aggregation in ("sequence", "token", "constant"):
        whole, units = aggregate_loss(per_token, mask, aggregation, 7)
        parts = [aggregate_loss(per_token[i : i + 2], mask[i : i + 2], aggregation, 7) for i in (0, 2, 4)]
        split = sum(p[0] for p in parts) / sum(p[1] for p in parts)
        assert split.item() == pytest.approx((whole / units).item(), abs=1e-6)

"""Do the tests guard tunelab's claims? Seed one small bug at a time and see the guarding tests fail.

    .venv/bin/python scripts/mutation_check.py                # every mutation (about 15 minutes on 2 cores)
    .venv/bin/python scripts/mutation_check.py --only dpo     # those whose name contains "dpo"
    .venv/bin/python scripts/mutation_check.py --list

Each mutation is a one-line change to a named function (the exact line and its replacement), with
the tests that claim to guard it. For each, the working tree is copied to a scratch folder (the
files git tracks or would track), the line is replaced there (it must occur exactly once), and the
tests run in that copy. The mutation is *caught* when pytest reports failed tests (exit 1); a pass
(exit 0) is *missed*; anything else (the tests cannot be collected, no test selected) is an
*error*, which counts as not caught. Before the mutations, the same tests run on the unchanged copy
and must pass. The last line is the summary: mutations, caught, missed, errors and the time taken.

Not part of `make test` (too slow for it). Add a mutation with every new exactness claim.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    claim: str
    """What the README or a docstring promises, that this bug breaks."""
    path: str
    """File, relative to the repository root."""
    function: str
    """The function the line is in (for the reader; the line itself locates the change)."""
    original: str
    """The exact line as it is (leading spaces included), found exactly once in the file."""
    mutated: str
    tests: tuple[str, ...]
    """pytest node ids or files; with `-k`, give it as one item `-k EXPR` after the files."""


MUTATIONS = [
    # ------------------------------------------------------------------ packing
    Mutation(
        "packing-first-label",
        "packed == unpacked: no loss across the boundary of two packed examples",
        "tunelab/data/packing.py",
        "pack_batch",
        "        [label if j > 0 else IGNORE_INDEX for e in examples for j, label in enumerate(e.labels)]",
        "        [label for e in examples for j, label in enumerate(e.labels)]",
        ("tests/unit/test_packing.py",),
    ),
    Mutation(
        "packed-attention-not-causal",
        "packed == unpacked: attention is causal within each packed example",
        "tunelab/kernels/packed_kernels.py",
        "per_example_sdpa",
        "                q, k, v, dropout_p=dropout, scale=scale, is_causal=True, enable_gqa=True",
        "                q, k, v, dropout_p=dropout, scale=scale, is_causal=False, enable_gqa=True",
        ("tests/unit/test_packed_kernels.py", "tests/unit/test_cpu_attention.py"),
    ),
    Mutation(
        "cpu-attention-exp-clamp-removed",
        "the C++ attention kernel equals SDPA, also when scores spread over thousands (NaN without the clamp)",
        "tunelab/kernels/cpu_attention.cpp",
        "exp (vectorised)",
        "  x = x < lowest ? lowest : x;",
        "",
        ("tests/unit/test_cpu_attention.py", "-k spread"),
    ),
    Mutation(
        "cpu-attention-offsets-unchecked",
        "the kernel's offsets are checked against the sequence length",
        "tunelab/kernels/cpu_attention.py",
        "check_offsets",
        "    if first != 0 or last != length or bool((cu[1:] < cu[:-1]).any()):",
        "    if first != 0 or bool((cu[1:] < cu[:-1]).any()):",
        ("tests/unit/test_cpu_attention.py::test_offsets_are_checked_against_the_sequence_length[short]",),
    ),
    Mutation(
        "packed-rows-not-sharded-over-ranks",
        "packing under DDP/FSDP: 2 ranks x b packed take the step of 1 process x 2b",
        "tunelab/objectives/sft.py",
        "sft_batches",
        "        batch = pack_batch(chosen) if config.data.packing else pad_batch(chosen, pad_id)",
        "        batch = pack_batch([examples[i] for i in indices]) if config.data.packing else pad_batch(chosen, pad_id)",
        ("tests/distributed/test_distributed_training.py", "-k packed"),
    ),
    # ------------------------------------------------------------------ the loop
    Mutation(
        "accumulation-per-micro-batch",
        "batch 8 x accumulation 1 gives the same step as 1 x 8 (the loss is divided by the units of the whole step)",
        "tunelab/training/loop.py",
        "accumulated_step",
        "            run.backward(loss_sum * run.dist.world_size / max(units, 1))",
        "            run.backward(loss_sum * run.dist.world_size / max(batch.units, 1))",
        (
            "tests/recipes/test_sft.py::test_accumulation_invariance",
            "tests/recipes/test_dpo.py::test_dpo_accumulation_invariance",
        ),
    ),
    Mutation(
        "resume-skips-optimizer-state",
        "a resumed run's losses equal those of a run that never stopped",
        "tunelab/training/checkpoint.py",
        "load_checkpoint",
        "        optimizer.load_state_dict(opt_state)",
        "        pass",
        ("tests/recipes/test_sft.py::test_resume_equals_no_stop",),
    ),
    Mutation(
        "resume-skips-rng-state",
        "a resumed run draws the random numbers (dropout, mini-batch shuffles) of one that never stopped",
        "tunelab/training/checkpoint.py",
        "load_checkpoint",
        "        restore_rng(rng, state)",
        "        pass",
        (
            "tests/recipes/test_sft.py::test_resume_with_dropout_draws_the_same_masks",
            "tests/recipes/test_grpo_resume.py",
        ),
    ),
    Mutation(
        "grpo-resume-restarts-the-prompts",
        "a resumed GRPO run continues with the next prompts",
        "tunelab/objectives/grpo.py",
        "run",
        "    prompt_batches = online.prompt_batches(position=start)",
        "    prompt_batches = online.prompt_batches(position=0)",
        ("tests/recipes/test_grpo_resume.py",),
    ),
    Mutation(
        "chunked-loss-drops-log-p-max",
        "the chunked (fused) loss equals the plain cross-entropy over full logits",
        "tunelab/losses/causal_lm.py",
        "_FusedLinearCrossEntropy.forward",
        "                total += (z_max - z_y - torch.log(g.amax(dim=-1))).sum()",
        "                total += (z_max - z_y).sum()",
        ("tests/unit/test_chunked_loss.py",),
    ),
    Mutation(
        "chunked-loss-gradient",
        "the chunked (fused) loss has the plain cross-entropy's gradients",
        "tunelab/losses/causal_lm.py",
        "_FusedLinearCrossEntropy.forward",
        "                g[torch.arange(y.numel(), device=y.device), y] -= 1.0  # p - onehot(y)",
        "                g[torch.arange(y.numel(), device=y.device), y] -= 0.5  # p - onehot(y)",
        ("tests/unit/test_chunked_loss.py",),
    ),
    Mutation(
        "non-finite-step-applied",
        "a step whose loss or gradient is not finite is not applied",
        "tunelab/training/loop.py",
        "apply_gradients",
        "    elif finite:",
        "    else:",
        ("tests/recipes/test_reliability.py", "-k not_finite or inf_step"),
    ),
    Mutation(
        "fp16-without-loss-scaling",
        "fp16 training scales the loss so that small gradients survive float16",
        "tunelab/training/setup.py",
        "Run.backward",
        "        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()",
        "        loss.backward()",
        ("tests/recipes/test_reliability.py", "-k fp16"),
    ),
    Mutation(
        "signal-ignored",
        "SIGTERM makes the run write a checkpoint at the end of the step and stop",
        "tunelab/training/loop.py",
        "StepLoop._stop_requested",
        "        asked = self.stop_signal is not None",
        "        asked = False",
        ("tests/recipes/test_reliability.py", "-k sigterm"),
    ),
    # ------------------------------------------------------------------ losses against TRL and by hand
    Mutation(
        "dpo-loss-beta-on-one-term",
        "the DPO loss equals TRL's on the same tensors",
        "tunelab/losses/dpo.py",
        "dpo_loss",
        "    logits = beta * (chosen_logratios - rejected_logratios)  # (B,)",
        "    logits = beta * chosen_logratios - rejected_logratios  # (B,)",
        ("tests/unit/test_losses_rlhf.py", "-k dpo"),
    ),
    Mutation(
        "bradley-terry-margin-sign",
        "the reward-model loss equals TRL's, margins included",
        "tunelab/losses/reward.py",
        "bradley_terry_loss",
        "        difference = difference - margin",
        "        difference = difference + margin",
        ("tests/unit/test_losses_rlhf.py", "-k bradley_terry"),
    ),
    Mutation(
        "ppo-clip-min-for-max",
        "the PPO clipped policy loss equals TRL's",
        "tunelab/losses/ppo.py",
        "clipped_policy_loss",
        "    return torch.max(unclipped, clipped), (clipped > unclipped).float()",
        "    return torch.min(unclipped, clipped), (clipped > unclipped).float()",
        ("tests/unit/test_losses_rlhf.py", "-k ppo_losses"),
    ),
    Mutation(
        "kl-k3-without-minus-one",
        "the k3 KL estimator equals TRL's GRPO and is exact in expectation",
        "tunelab/losses/kl.py",
        "kl_k3",
        "    return torch.exp(log_ratio) - log_ratio - 1.0",
        "    return torch.exp(log_ratio) - log_ratio",
        ("tests/unit/test_losses_rlhf.py", "-k kl or k3 or grpo"),
    ),
    Mutation(
        "gae-without-lambda",
        "GAE advantages equal TRL's",
        "tunelab/rl/advantages.py",
        "gae",
        "        running = delta + gamma * lam * running",
        "        running = delta + gamma * running",
        ("tests/unit/test_losses_rlhf.py", "-k gae"),
    ),
    Mutation(
        "group-advantages-unscaled",
        "GRPO group advantages equal TRL's",
        "tunelab/rl/advantages.py",
        "group_advantages",
        "        advantages = advantages / (std + eps)",
        "        advantages = advantages / (std + 1.0)",
        ("tests/unit/test_losses_rlhf.py", "-k group_advantages"),
    ),
    # ------------------------------------------------------------------ objectives
    Mutation(
        "dpo-policy-chosen-rejected-swapped",
        "DPO prefers the chosen response: policy and reference log-probs are paired the right way round",
        "tunelab/objectives/dpo.py",
        "pair_losses",
        "    policy_chosen, policy_rejected = sequence_logprobs(model, batch).chunk(2)",
        "    policy_rejected, policy_chosen = sequence_logprobs(model, batch).chunk(2)",
        ("tests/recipes/test_dpo.py",),
    ),
    Mutation(
        "dpo-pairs-swapped-for-policy-and-reference",
        "DPO prefers the chosen response (the review's seeded bug: both pairs swapped)",
        "tunelab/objectives/dpo.py",
        "pair_losses",
        "        policy_chosen, policy_rejected, ref_chosen, ref_rejected, options.beta, options.label_smoothing",
        "        policy_rejected, policy_chosen, ref_rejected, ref_chosen, options.beta, options.label_smoothing",
        ("tests/recipes/test_dpo.py",),
    ),
    Mutation(
        "dpo-label-smoothing-ignored",
        "conservative DPO: label_smoothing enters the loss",
        "tunelab/objectives/dpo.py",
        "pair_losses",
        "        policy_chosen, policy_rejected, ref_chosen, ref_rejected, options.beta, options.label_smoothing",
        "        policy_chosen, policy_rejected, ref_chosen, ref_rejected, options.beta, 0.0",
        ("tests/recipes/test_dpo.py",),
    ),
    Mutation(
        "dpo-reference-is-the-policy",
        "the DPO reference is the model with the method switched off",
        "tunelab/reference.py",
        "Reference.model",
        "        with self.method.disabled(self.policy) as base:",
        "        with contextlib.nullcontext(self.policy) as base:",
        ("tests/recipes/test_dpo.py",),
    ),
    Mutation(
        "preference-rows-swapped",
        "a pair batch holds the chosen rows first, then the rejected",
        "tunelab/data/preference.py",
        "pad_pairs",
        "    batch = pad_batch([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)",
        "    batch = pad_batch([p.rejected for p in pairs] + [p.chosen for p in pairs], pad_id)",
        ("tests/recipes/test_dpo.py",),
    ),
    Mutation(
        "grpo-groups-the-wrong-prompts",
        "GRPO compares each completion with the other completions of its own prompt",
        "tunelab/objectives/grpo.py",
        "grpo_step",
        "    prompts = [prompt for prompt in prompts for _ in range(group)]",
        "    prompts = [prompt for _ in range(group) for prompt in prompts]",
        ("tests/recipes/test_grpo.py",),
    ),
    Mutation(
        "grpo-group-advantages-across-prompts",
        "GRPO advantages are taken within each prompt's group",
        "tunelab/rl/advantages.py",
        "group_advantages",
        "    grouped = rewards.view(-1, group_size)  # (P, G)",
        "    grouped = rewards.view(group_size, -1).t()  # (P, G)",
        ("tests/recipes/test_grpo.py", "tests/unit/test_losses_rlhf.py"),
    ),
    Mutation(
        "rl-scores-the-wrong-prompts",
        "each sampled answer is scored against its own prompt",
        "tunelab/rl/online.py",
        "OnlineRun._score",
        "            [p.prompt for p in prompts],",
        "            [p.prompt for p in prompts[::-1]],",
        ("tests/recipes/test_grpo.py",),
    ),
    Mutation(
        "kl-k1-sign",
        "the k1 KL estimator (PPO's penalty) equals TRL's RLOO code",
        "tunelab/losses/kl.py",
        "kl_k1",
        "    return logprobs - ref_logprobs",
        "    return ref_logprobs - logprobs",
        ("tests/unit/test_losses_rlhf.py", "-k kl or k1"),
    ),
    # ------------------------------------------------------------------ methods
    Mutation(
        "lora-merge-without-scaling",
        "a merged LoRA model computes what the unmerged one did",
        "tunelab/methods/lora_layer.py",
        "LoRALinear.delta_weight",
        "        delta = self.scaling * (self.lora_B.weight @ self.lora_A.weight)  # (out, in)",
        "        delta = self.lora_B.weight @ self.lora_A.weight  # (out, in)",
        ("tests/unit/test_method_contract.py", "tests/unit/test_lora.py", "-k merge"),
    ),
    Mutation(
        "lora-saves-the-wrong-alpha",
        "PEFT loads a tunelab LoRA adapter and computes the same logits",
        "tunelab/methods/lora_io.py",
        "peft_config",
        '        "lora_alpha": alpha,',
        '        "lora_alpha": alpha * 2,',
        ("tests/unit/test_lora_peft_interop.py", "-k loads_in_peft"),
    ),
    Mutation(
        "lora-reads-rslora-wrong",
        "tunelab loads PEFT's LoRA adapters (rsLoRA included) and computes the same logits",
        "tunelab/methods/lora.py",
        "options_from_peft_config",
        '        "use_rslora": bool(config.get("use_rslora", False)),',
        '        "use_rslora": False,',
        ("tests/unit/test_lora_peft_interop.py", "-k peft_adapter_loads_in_tunelab"),
    ),
    Mutation(
        "prefix-positions-not-shifted",
        "prefix tuning: real tokens take positions m, m+1, ... after the m prefix positions",
        "tunelab/methods/prefix.py",
        "_shift_mask_and_positions",
        '        inputs["position_ids"] = positions[:, -length:] + m  # (B, T)',
        '        inputs["position_ids"] = positions[:, -length:]  # (B, T)',
        ("tests/unit/test_prefix_peft_interop.py", "-k generation"),
    ),
    Mutation(
        "prefix-generate-without-prefix",
        "prefix tuning's generation keeps the prefix in the cache",
        "tunelab/methods/prefix.py",
        "_prefix_cache",
        "        kv.fill_cache(cache, encoder.layer_key_values(batch_size, model.dtype, tokens.device))",
        "        pass",
        ("tests/unit/test_prefix_peft_interop.py", "-k generation"),
    ),
    # ------------------------------------------------------------------ options that do nothing
    Mutation(
        "packing-silently-ignored-by-dpo",
        "an option that does nothing for an objective says so",
        "tunelab/objectives/pairs.py",
        "report_pairs",
        "    if run.config.data.packing:",
        "    if False:",
        ("tests/unit/test_config.py", "-k packing_ignored"),
    ),
    Mutation(
        "prefix-with-packing-accepted",
        "prefix tuning with packing is refused when the config loads",
        "tunelab/config.py",
        "_check_run",
        '    if config.data.packing and config.method.name == "prefix" and config.objective.name == "sft":',
        "    if False:",
        ("tests/unit/test_config.py", "-k prefix_tuning_with_packing"),
    ),
    # ------------------------------------------------------------------ distributed
    Mutation(
        "ranks-average-not-sum",
        "2 ranks x b take the step of 1 process x 2b",
        "tunelab/training/loop.py",
        "accumulated_step",
        "            run.backward(loss_sum * run.dist.world_size / max(units, 1))",
        "            run.backward(loss_sum / max(units, 1))",
        (
            "tests/distributed/test_distributed_training.py::test_two_ranks_equal_one_process_with_double_batch",
        ),
    ),
    # ------------------------------------------------------------------ chained runs, reward models
    Mutation(
        "chain-earlier-lora-not-merged",
        "a run from an earlier LoRA run has that run's model as pi_ref, not the bare base",
        "tunelab/trained.py",
        "load_start",
        "    elif method in MERGEABLE:",
        "    elif False:",
        ("tests/recipes/test_chains.py", "-k reference_is_the_sft_model"),
    ),
    Mutation(
        "chain-continue-reference-disabled",
        "an earlier adapter trained further is compared with a frozen copy of the starting model",
        "tunelab/reference.py",
        "Reference.__init__",
        "        if not method.DISABLES_TO_BASE or (start is not None and start.continued):",
        "        if not method.DISABLES_TO_BASE:",
        ("tests/recipes/test_chains.py", "-k continuing"),
    ),
    Mutation(
        "reward-pooling-on-pad",
        "a saved reward model scores as transformers' sequence classifier (last non-padding token)",
        "tunelab/rl/reward_model.py",
        "pooling_mask",
        "    return torch.where(not_pad.any(dim=1, keepdim=True), not_pad, mask)",
        "    return mask",
        ("tests/recipes/test_reward.py", "-k pools_where"),
    ),
    # ------------------------------------------------------------------ DoRA, preference losses, data, export
    Mutation(
        "dora-norm-with-gradient",
        "DoRA's column norm is a constant in backward (the paper's and PEFT's gradient)",
        "tunelab/methods/lora_layer.py",
        "LoRALinear.weight_norm",
        "        with torch.no_grad():",
        "        with torch.enable_grad():",
        ("tests/unit/test_dora.py",),
    ),
    Mutation(
        "simpo-gamma-sign",
        "SimPO's margin gamma is subtracted: -log sigma(beta (avg(c) - avg(r)) - gamma)",
        "tunelab/losses/simpo.py",
        "simpo_loss",
        "    z = beta * (chosen_avg_logps - rejected_avg_logps) - gamma  # (B,)",
        "    z = beta * (chosen_avg_logps - rejected_avg_logps) + gamma  # (B,)",
        ("tests/unit/test_preference_losses.py",),
    ),
    Mutation(
        "kto-z0-not-clamped",
        "KTO's reference point z0 is max(0, mean mismatched log-ratio)",
        "tunelab/losses/kto.py",
        "reference_point",
        "    return (kl_logratio_sum.detach() / max(count, 1)).clamp(min=0)",
        "    return kl_logratio_sum.detach() / max(count, 1)",
        ("tests/unit/test_preference_losses.py",),
    ),
    Mutation(
        "cache-key-without-tokenizer",
        "the token cache is rebuilt when the tokenizer changes",
        "tunelab/data/cache.py",
        "cache_key",
        "    digest.update(tokenizer_fingerprint(tokenizer).encode())",
        "    pass",
        ("tests/unit/test_token_cache.py",),
    ),
    Mutation(
        "gguf-no-rotary-reorder",
        "an exported Llama GGUF reads back with the model's logits (llama.cpp's rotary row order)",
        "tunelab/export/gguf_tensors.py",
        "gguf_values",
        "        data = interleave_rotary(data, config.num_attention_heads)",
        "        pass",
        ("tests/unit/test_gguf_export.py", "-k reads_back"),
    ),
]


def scratch_copy(destination: Path) -> None:
    """The files git tracks, or would track, copied as they are in the working tree."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def hits(root: Path, mutation: Mutation) -> list[int]:
    """The indices of the lines of the mutation's file that are its original line."""
    lines = (root / mutation.path).read_text().split("\n")
    return [i for i, line in enumerate(lines) if line == mutation.original]


def apply(copy: Path, mutation: Mutation) -> None:
    path = copy / mutation.path
    lines = path.read_text().split("\n")
    (index,) = hits(copy, mutation)
    lines[index] = mutation.mutated
    path.write_text("\n".join(lines))


def pytest_args(tests: tuple[str, ...]) -> list[str]:
    args = []
    for item in tests:
        args += ["-k", item[3:]] if item.startswith("-k ") else [item]
    return args


def run_tests(copy: Path, tests: tuple[str, ...], extensions: Path) -> tuple[int, float]:
    """(pytest's exit code, seconds) of `tests` in the scratch copy."""
    env = {
        **os.environ,
        "PYTHONPATH": str(copy),
        "HF_HUB_OFFLINE": "1",
        "TORCH_EXTENSIONS_DIR": str(extensions),  # a mutated C++ kernel never replaces the real build
    }
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *pytest_args(tests)]
    code = subprocess.run(cmd, cwd=copy, env=env, capture_output=True).returncode
    return code, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="run only the mutations whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the mutations and their claims")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if args.only is None or args.only in m.name]
    if args.list:
        for m in chosen:
            print(f"{m.name:36s} {m.path}:{m.function}  -- {m.claim}")
        return 0
    stale = [f"{m.name} ({m.path}: {len(hits(ROOT, m))} matches)" for m in chosen if len(hits(ROOT, m)) != 1]
    if stale:  # the code moved on: each line must be found exactly once
        print(f"mutations whose line is not found exactly once: {', '.join(stale)}")
        return 2
    started = time.perf_counter()
    caught = missed = errors = 0
    with tempfile.TemporaryDirectory(prefix="tunelab-mutation-") as scratch:
        scratch = Path(scratch)
        baseline = scratch / "baseline"
        scratch_copy(baseline)
        every_test = tuple(dict.fromkeys(t for m in chosen for t in m.tests if not t.startswith("-k ")))
        code, seconds = run_tests(baseline, every_test, scratch / "extensions-baseline")
        print(
            f"baseline: the guarding tests {'pass' if code == 0 else f'FAIL (exit {code})'} ({seconds:.0f} s)"
        )
        if code != 0:
            return 2
        for index, mutation in enumerate(chosen):
            copy = scratch / f"m{index}"
            shutil.copytree(baseline, copy)
            apply(copy, mutation)
            code, seconds = run_tests(copy, mutation.tests, scratch / f"extensions-{index}")
            verdict = {0: "MISSED", 1: "caught"}.get(code, f"ERROR (pytest exit {code})")
            caught += code == 1
            missed += code == 0
            errors += code not in (0, 1)
            print(
                f"{verdict:8s} {mutation.name:36s} {seconds:5.0f} s  {mutation.path}:{mutation.function}",
                flush=True,
            )
            shutil.rmtree(copy)
    total = time.perf_counter() - started
    print(
        f"mutation check: {len(chosen)} mutations, {caught} caught, {missed} missed, {errors} errors, "
        f"{total / 60:.1f} min"
    )
    return 0 if caught == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Runs that start from earlier runs (SFT -> DPO / PPO / GRPO / reward), as users chain them.

The reference policy of the later run must be the model the earlier run trained (pi_start), never
the bare base: checked on log-probabilities against the SFT model loaded for inference, and against
the base (which must differ, or the check could not fail). Then the chained runs train, save and load.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import tunelab
from tests.helpers import params_with_lora, rlhf_config, sft_config
from tunelab.data.preference import pad_pairs, prepare_preferences
from tunelab.errors import ConfigError
from tunelab.logprobs import sequence_logprobs
from tunelab.merging import merge_adapter
from tunelab.models import load_model
from tunelab.reference import Reference, reference_sequence_logprobs
from tunelab.trained import load_trained
from tunelab.training.metrics import read_metrics
from tunelab.training.setup import setup_run

ROOT = Path(__file__).resolve().parents[2]
PAIRS = ROOT / "data" / "rlhf" / "preference_train.jsonl"
PROMPTS = ROOT / "data" / "rlhf" / "prompts_train.jsonl"
LORA = {"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"}
ADAPTER = {"name": "adapter", "reduction_factor": 4}
SFT_STEPS = ["train.max_steps=8", "train.lr=1e-2", "eval.generate=false"]


@pytest.fixture(scope="module")
def sft_runs(llama_dir, instruction_data, tmp_path_factory):
    """Two SFT runs on the tiny Llama: LoRA (an adapter folder) and full (a model folder)."""
    root = tmp_path_factory.mktemp("sft")
    for name, method in (("lora", LORA), ("full", {"name": "full"}), ("adapter", ADAPTER)):
        tunelab.train(sft_config(llama_dir, instruction_data[0], root / name, *SFT_STEPS, method=method))
    return root


def dpo_config(start, output_dir, *overrides, method=LORA):
    train = {"max_steps": 4, "batch_size": 8, "lr": 1e-3}
    objective = {"name": "dpo", "beta": 0.1}
    return rlhf_config(start, output_dir, overrides, objective, PAIRS, None, method, train)


def pair_batch(run) -> dict:
    """The first 4 training pairs, padded: chosen rows then rejected rows."""
    pairs = prepare_preferences(run.config.data, run.tokenizer).train[:4]
    return pad_pairs(pairs, run.tokenizer.pad_token_id)


def policy_logprobs(model, batch) -> torch.Tensor:
    """Summed log-prob of each row's target tokens under `model`: (2B,)."""
    with torch.no_grad():
        return sequence_logprobs(model, batch)


def assert_reference_is(run, expected_model, base_model, batch) -> None:
    """pi_ref of `run` equals `expected_model` on `batch`, and differs from `base_model`."""
    reference = Reference(run.model, run.method, None, run.start)
    ref = reference_sequence_logprobs(reference, batch)
    torch.testing.assert_close(ref, policy_logprobs(expected_model, batch), rtol=1e-5, atol=1e-4)
    assert (ref - policy_logprobs(base_model, batch)).abs().max() > 1e-2


@pytest.mark.parametrize(
    ("earlier", "method"),
    [("lora", LORA), ("full", ADAPTER), ("adapter", LORA)],
    ids=["lora-on-lora-sft", "adapter-on-full-sft", "lora-on-adapter-sft"],
)
def test_the_reference_is_the_sft_model_not_the_base(sft_runs, llama_dir, tmp_path, earlier, method):
    run = setup_run(dpo_config(sft_runs / earlier, tmp_path / "dpo", method=method))
    batch = pair_batch(run)
    sft_model, _, _ = load_trained(sft_runs / earlier, device="cpu")
    base = load_model(str(llama_dir), device="cpu")
    assert_reference_is(run, sft_model, base, batch)
    # Before any step the policy is pi_start too.
    torch.testing.assert_close(
        policy_logprobs(run.model, batch), policy_logprobs(sft_model, batch), atol=1e-4, rtol=1e-5
    )
    assert str(sft_runs / earlier) in Reference(run.model, run.method, None, run.start).kind


def test_dpo_from_a_lora_sft_run_trains_saves_and_loads(sft_runs, llama_dir, tmp_path, capsys):
    """From the SFT run folder: the first loss is exactly log 2 (policy = reference = SFT model), the
    log names the SFT run as the reference, and the DPO adapter loads on top of the merged SFT model
    with the trained model's log-probabilities; a third run chains on the second."""
    out = tmp_path / "dpo"
    tunelab.train(dpo_config(sft_runs / "lora", out, "train.max_steps=10", "train.lr=1e-2"))
    log = capsys.readouterr().out
    reference_line = next(line for line in log.splitlines() if "reference policy" in line)
    assert f"lora disabled = {llama_dir} + lora {sft_runs / 'lora' / 'final'} (merged)" in reference_line
    rows = read_metrics(out)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert max(r["loss"] for r in rows[-2:]) < math.log(2) - 0.01  # it learns from there
    saved = json.loads((out / "final" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(sft_runs / "lora")
    card = (out / "final" / "README.md").read_text()
    assert (
        f"- reference policy: the starting model, `{llama_dir} + lora {sft_runs / 'lora' / 'final'} (merged)`"
        in card
    )
    run = setup_run(dpo_config(out, tmp_path / "third"))  # DPO on top of the DPO run
    batch = pair_batch(run)
    dpo_model, _, method = load_trained(out, device="cpu")
    sft_model, _, _ = load_trained(sft_runs / "lora", device="cpu")
    assert method == "lora"
    assert_reference_is(run, dpo_model, sft_model, batch)
    merged = merge_adapter(out, tmp_path / "merged")  # the whole chain folded into one model
    merged_model, _, _ = load_trained(merged, device="cpu")
    torch.testing.assert_close(
        policy_logprobs(merged_model, batch), policy_logprobs(dpo_model, batch), atol=1e-4, rtol=1e-5
    )


def test_continuing_the_earlier_adapter(sft_runs, llama_dir, tmp_path, capsys):
    """`earlier_adapter=continue`: the SFT LoRA itself trains (its saved options, not the config's),
    the reference is a frozen copy of the SFT model, and the result names the SFT run's base."""
    cfg = dpo_config(sft_runs / "lora", tmp_path / "dpo", "model.earlier_adapter=continue", "method.r=16")
    run = setup_run(cfg)
    assert run.config.method.options.r == 4 and run.start.continued == "lora"
    sft_model, _, _ = load_trained(sft_runs / "lora", device="cpu")
    base = load_model(str(llama_dir), device="cpu")
    batch = pair_batch(run)
    assert_reference_is(run, sft_model, base, batch)
    assert Reference(run.model, run.method, None, run.start).copy is not None
    tunelab.train(dpo_config(sft_runs / "lora", tmp_path / "dpo", "model.earlier_adapter=continue"))
    saved = json.loads((tmp_path / "dpo" / "final" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(llama_dir) and saved["r"] == 4
    assert read_metrics(tmp_path / "dpo")[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_chains_that_cannot_work_are_refused(sft_runs, llama_dir, tmp_path):
    with pytest.raises(ConfigError, match="second one on top"):
        setup_run(dpo_config(sft_runs / "adapter", tmp_path / "a", method=ADAPTER))
    with pytest.raises(ConfigError, match="method.name=lora"):
        setup_run(
            dpo_config(sft_runs / "lora", tmp_path / "b", "model.earlier_adapter=continue", method=ADAPTER)
        )
    with pytest.raises(ConfigError, match="not an earlier run"):
        setup_run(dpo_config(llama_dir, tmp_path / "c", "model.earlier_adapter=continue"))


@pytest.mark.parametrize("objective", ["ppo", "grpo"])
def test_online_rl_from_a_lora_sft_run_starts_at_zero_kl(sft_runs, tmp_path, objective, capsys):
    """PPO and GRPO from the SFT run: at the first step the policy is the reference (KL 0); KL to the
    bare base would not be 0."""
    options = {"name": objective, "reward_functions": ["tunelab.rl.rewards:one_line"], "max_new_tokens": 8}
    options.update({"num_generations": 4, "beta": 0.1} if objective == "grpo" else {"kl_coef": 0.1})
    train = {"max_steps": 2, "batch_size": 4, "lr": 1e-3}
    out = tmp_path / objective
    cfg = rlhf_config(sft_runs / "lora", out, [], options, PROMPTS, None, LORA, train, {"num_examples": 4})
    tunelab.train(cfg)
    assert f"lora {sft_runs / 'lora' / 'final'} (merged)" in capsys.readouterr().out
    rows = read_metrics(out)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert (out / "final" / "adapter_config.json").is_file()
    load_trained(out, device="cpu")


def test_reward_model_from_an_sft_run(sft_runs, tmp_path):
    """A reward model starts from the SFT run folder like any objective."""
    out = tmp_path / "rm"
    train = {"max_steps": 3, "batch_size": 8, "lr": 1e-3}
    tunelab.train(rlhf_config(sft_runs / "full", out, [], {"name": "reward"}, PAIRS, None, LORA, train))
    assert (out / "final").is_dir() and len(read_metrics(out)) == 3


def test_inspect_a_chained_config(sft_runs, llama_dir, tmp_path, capsys):
    """`tunelab inspect` of a config that starts from an earlier LoRA run reads the architecture of
    the base at the bottom of the chain: the base's parameters plus the new method's."""
    from tunelab.cli import main

    base = load_model(str(llama_dir), device="cpu")
    total = params_with_lora(base, r=4)
    config = tmp_path / "dpo.yaml"
    config.write_text(
        f"model: {{name_or_path: {sft_runs / 'lora'}}}\nmethod: {json.dumps(LORA)}\n"
        "objective: {name: dpo}\ndata: {train: unused.jsonl, max_length: 16}\n"
    )
    capsys.readouterr()
    assert main(["inspect", str(config)]) == 0
    assert f"all params: {total:,}" in capsys.readouterr().out

"""DPO recipe on a tiny model: the held-out margin rises (full and LoRA), the first loss is log 2,
accumulation invariance, every method's reference policy, and the token log-probs it rests on."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tunelab
from tests.helpers import rlhf_config
from tunelab.data.collate import pad_batch
from tunelab.data.tokenize import TokenizedExample
from tunelab.logprobs import sequence_logprobs
from tunelab.methods import get_method
from tunelab.reference import Reference, reference_sequence_logprobs
from tunelab.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
PAIRS = ROOT / "data" / "rlhf" / "preference_train.jsonl"
HELD_OUT = ROOT / "data" / "rlhf" / "preference_eval.jsonl"
LORA = {"name": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear"}


def dpo_config(model_dir, output_dir, *overrides, method=None, eval_file=HELD_OUT, **objective):
    train_section = {"max_steps": 60, "batch_size": 16, "lr": 1e-3, "log_every": 1}
    objective = {"name": "dpo", **objective}
    return rlhf_config(model_dir, output_dir, overrides, objective, PAIRS, eval_file, method, train_section)


@pytest.mark.parametrize(
    ("method", "overrides"),
    [({"name": "full"}, ["train.max_steps=60"]), (LORA, ["train.max_steps=80", "train.lr=3e-3"])],
    ids=["full", "lora"],
)
def test_dpo_raises_the_held_out_margin(llama_dir, tmp_path, method, overrides):
    """Before training the policy is the reference, so every implicit reward, the margin and the
    first loss (-log sigma(0) = log 2) are exactly 0, 0 and log 2; training raises the held-out margin."""
    out = tmp_path / "dpo"
    summary = tunelab.train(dpo_config(llama_dir, out, *overrides, method=method, beta=0.1))
    assert summary["eval_margin_before"] == pytest.approx(0.0, abs=1e-5)
    assert summary["eval_margin"] > 0.05 and summary["eval_accuracy"] > 0.55
    rows = read_metrics(out)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert all(
        {"step", "loss", "reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy"} <= set(r)
        for r in rows
    )
    artifact = "adapter_config.json" if method["name"] == "lora" else "config.json"
    assert (out / "final" / artifact).is_file()


def test_dpo_accumulation_invariance(llama_dir, tmp_path):
    """batch 8 x accumulation 1 takes the same steps as batch 2 x accumulation 4 (units = pairs)."""
    common = ["train.max_steps=3", "train.lr=1e-2"]
    tunelab.train(dpo_config(llama_dir, tmp_path / "a", *common, "train.batch_size=8", eval_file=None))
    tunelab.train(
        dpo_config(
            llama_dir, tmp_path / "b", *common, "train.batch_size=2", "train.grad_accum=4", eval_file=None
        )
    )
    a = [r["loss"] for r in read_metrics(tmp_path / "a")]
    b = [r["loss"] for r in read_metrics(tmp_path / "b")]
    assert a == pytest.approx(b, rel=1e-4) and a[-1] != pytest.approx(a[0], abs=1e-4)


@pytest.mark.parametrize(
    "method",
    [
        {"name": "partial", "last_layers": 1},
        {"name": "adapter", "bottleneck": 8},
        {"name": "prefix", "num_virtual_tokens": 4},
        {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"], "label_smoothing": 0.1},
    ],
    ids=["partial", "adapter", "prefix", "lora-cdpo"],
)
def test_every_method_trains_with_dpo(llama_dir, tmp_path, method):
    method = dict(method)
    smoothing = method.pop("label_smoothing", 0.0)
    tunelab.train(
        dpo_config(
            llama_dir,
            tmp_path / "run",
            "train.max_steps=2",
            method=method,
            eval_file=None,
            label_smoothing=smoothing,
        )
    )
    losses = [r["loss"] for r in read_metrics(tmp_path / "run")]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    if method["name"] != "prefix":  # a fresh prefix is not the identity, so pi != pi_ref at step 1
        assert losses[0] == pytest.approx(math.log(2), abs=1e-5)


def _batch(tokenizer):
    ids = [tokenizer("the quick brown fox")["input_ids"], tokenizer("a lazy dog yes")["input_ids"]]
    examples = [TokenizedExample(x, [-100] * 2 + x[2:]) for x in ids]
    return pad_batch(examples, tokenizer.pad_token_id)


def test_sequence_logprobs_match_a_full_softmax(llama_dir):
    """Summed target log-probs from chunked hidden states = log_softmax of the full logits, gathered."""
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    batch = _batch(tokenizer)
    with torch.no_grad():
        ours = sequence_logprobs(model, batch)
        logp = torch.log_softmax(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1
        )
    expected = torch.zeros(2)
    for b in range(2):
        for t in range(1, batch["input_ids"].shape[1]):
            if batch["labels"][b, t] != -100:
                expected[b] += logp[b, t - 1, batch["input_ids"][b, t]]
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("full", {}),
        ("partial", {"last_layers": 1}),
        ("lora", {"r": 4, "target_modules": ["q_proj", "v_proj"]}),
        ("adapter", {"bottleneck": 8}),
        ("prefix", {"num_virtual_tokens": 4}),
    ],
)
def test_reference_is_the_starting_model_after_training(llama_dir, name, options):
    """After optimizer steps that move the policy, the reference log-probs are still the base
    model's: the method's `disabled` context (lora, adapter, prefix) or the frozen copy (full, partial)."""
    from tunelab.config import build_dataclass

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    batch = _batch(tokenizer)
    base = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    with torch.no_grad():
        expected = sequence_logprobs(base, batch)
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    method = get_method(name)
    method.apply(model, build_dataclass(method.Options, options, "method", ""))
    reference = Reference(model, method)
    assert (reference.copy is None) == method.DISABLES_TO_BASE
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        (-sequence_logprobs(model, batch).sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        moved = sequence_logprobs(model, batch)
        ref = reference_sequence_logprobs(reference, batch)
    assert not torch.allclose(moved, expected, atol=1e-3)
    torch.testing.assert_close(ref, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(
            sequence_logprobs(model, batch), moved
        )  # the policy is back after the block

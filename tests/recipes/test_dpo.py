"""DPO recipe on a tiny model: the held-out margin rises (full and LoRA), the first loss is log 2,
accumulation invariance, every method's reference policy, and the token log-probs it rests on."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

import tunelab
from tests.helpers import rlhf_config
from tunelab.data.collate import pad_batch
from tunelab.data.preference import PairExample, pad_pairs
from tunelab.data.tokenize import TokenizedExample
from tunelab.logprobs import sequence_logprobs
from tunelab.methods import get_method, lora
from tunelab.objectives.dpo import Options, dpo_loss_sum, pair_losses
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


def random_pairs(seed: int, lengths: list[tuple[int, int, int]]) -> tuple[list[tuple], list[PairExample]]:
    """(prompt, chosen, rejected) lists of random token ids of the given lengths, and the same as
    pairs whose prompt is not a target."""
    g = torch.Generator().manual_seed(seed)

    def tokens(n):
        return torch.randint(10, 400, (n,), generator=g).tolist()

    sides = [(tokens(p), tokens(c), tokens(r)) for p, c, r in lengths]
    pairs = [
        PairExample(
            TokenizedExample(p + c, [-100] * len(p) + c), TokenizedExample(p + r, [-100] * len(p) + r)
        )
        for p, c, r in sides
    ]
    return sides, pairs


def _plain_completion_logprob(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """sum_t log p(completion_t | prompt, completion_<t) from one plain forward of the unpadded sequence."""
    ids = torch.tensor([prompt + completion])
    logp = model(ids).logits.log_softmax(-1)[0]  # (T, V)
    return sum(logp[t - 1, ids[0, t]] for t in range(len(prompt), ids.shape[1]))


def test_dpo_loss_is_the_formula_on_plain_forwards(llama_dir):
    """`pair_losses` / `dpo_loss_sum` on a padded batch of pairs, with a policy (LoRA, B randomised)
    away from the reference (the base model, loaded separately), equal the DPO formula written out
    here on log-probs from plain forwards: Delta = (pi(c) - ref(c)) - (pi(r) - ref(r)),
    L = -(1 - eps) log sigma(beta Delta) - eps log sigma(-beta Delta), for eps = 0 and eps = 0.25.
    Swapping chosen and rejected anywhere turns Delta into -Delta; ignoring eps drops eps * beta * Delta."""
    sides, pairs = random_pairs(7, [(4, 5, 3), (6, 2, 7), (3, 4, 4)])
    reference_model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    torch.manual_seed(1)  # A and B: the same policy whatever ran before
    lora.apply(model, lora.Options(r=4, alpha=8, target_modules="all-linear"))
    for layer in lora.lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.5)
    with torch.no_grad():
        delta = torch.stack(
            [
                (_plain_completion_logprob(model, p, c) - _plain_completion_logprob(reference_model, p, c))
                - (_plain_completion_logprob(model, p, r) - _plain_completion_logprob(reference_model, p, r))
                for p, c, r in sides
            ]
        )  # (P,)
    beta = 1.0
    assert (beta * delta).abs().min() > 0.05  # far enough from 0 to tell Delta from -Delta, eps from 0
    batch = pad_pairs(pairs, pad_id=0)
    for eps in (0.0, 0.25):
        expected = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
        options = Options(beta=beta, label_smoothing=eps)
        with torch.no_grad():
            losses, chosen, rejected = pair_losses(model, Reference(model, lora), options, batch)
            total, extras = dpo_loss_sum(model, Reference(model, lora), options, batch)
        torch.testing.assert_close(losses, expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(chosen - rejected, beta * delta, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(total, expected.sum(), rtol=1e-4, atol=1e-5)
        assert float(extras["reward_margin"]) == pytest.approx(float(beta * delta.sum()), abs=1e-4)
        assert float(extras["reward_accuracy"]) == float((delta > 0).sum())


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


@pytest.mark.parametrize("loss", ["ipo", "simpo", "orpo"])
def test_pairwise_losses_are_their_formulas_on_plain_forwards(llama_dir, loss):
    """`pair_losses` with `loss` ipo, simpo or orpo, on a padded batch of pairs of unequal lengths
    with a policy (LoRA, B randomised) away from the reference (the base model, loaded
    separately), equals the formula written out here on sums s and token counts n from plain forwards:
    ipo (h - 1/(2 beta))^2, h = (s_c - ref_c) / n_c - (s_r - ref_r) / n_r; simpo
    -log sigma(beta (s_c / n_c - s_r / n_r) - gamma); orpo -a_c - beta log sigma(log odds(a_c) -
    log odds(a_r)), a = s / n, log odds(a) = a - log(1 - e^a). SimPO and ORPO get no reference."""
    sides, pairs = random_pairs(11, [(4, 5, 2), (6, 1, 7), (3, 3, 4)])
    reference_model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    torch.manual_seed(1)
    lora.apply(model, lora.Options(r=4, alpha=8, target_modules="all-linear"))
    for layer in lora.lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.5)
    with torch.no_grad():
        s = torch.tensor(
            [[float(_plain_completion_logprob(model, p, y)) for y in (c, r)] for p, c, r in sides]
        )
        ref = torch.tensor(
            [[float(_plain_completion_logprob(reference_model, p, y)) for y in (c, r)] for p, c, r in sides]
        )
    n = torch.tensor([[len(c), len(r)] for _, c, r in sides], dtype=torch.float32)  # (P, 2)
    beta, gamma = 0.5, 0.3
    a = s / n  # (P, 2)
    if loss == "ipo":
        h = (s[:, 0] - ref[:, 0]) / n[:, 0] - (s[:, 1] - ref[:, 1]) / n[:, 1]
        expected = (h - 1 / (2 * beta)) ** 2
    elif loss == "simpo":
        expected = -F.logsigmoid(beta * (a[:, 0] - a[:, 1]) - gamma)
    else:
        odds = a.double() - torch.log1p(-torch.exp(a.double()))
        expected = (-a[:, 0] - beta * F.logsigmoid(odds[:, 0] - odds[:, 1]).float()).float()
    options = Options(loss=loss, beta=beta, simpo_gamma=gamma)
    reference = Reference(model, lora) if loss == "ipo" else None
    with torch.no_grad():
        losses, _, _ = pair_losses(model, reference, options, pad_pairs(pairs, pad_id=0))
    torch.testing.assert_close(losses, expected, rtol=1e-4, atol=1e-5)

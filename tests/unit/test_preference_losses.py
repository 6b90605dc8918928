"""IPO, SimPO, ORPO and KTO against hand-derived values and against TRL 1.16.0's own code on the
same tensors.

TRL 1.16 keeps IPO in `DPOTrainer._compute_loss` (loss_type "ipo"), SimPO in the experimental CPO
trainer (`trl.experimental.cpo`, loss_type "simpo"), ORPO in `trl.experimental.orpo` and KTO in
`trl.trainer.kto_trainer`. As in test_losses_rlhf.py, TRL's methods run with a stand-in `self` (no
model, no accelerator); where TRL computes log-probs from logits (`get_batch_logps`), its function
runs on a tiny model's logits and is compared with ours.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.unit.test_losses_rlhf import Accelerator, metrics, trl_dpo_compute_loss
from tunelab.data.collate import pad_batch
from tunelab.data.tokenize import TokenizedExample
from tunelab.losses.dpo import ipo_loss
from tunelab.losses.kto import kto_loss, kto_reference_point
from tunelab.losses.orpo import log1mexp, orpo_loss
from tunelab.losses.simpo import simpo_loss
from tunelab.objectives.dpo import average_logprobs


def per_token(summed: torch.Tensor, lengths: torch.Tensor, width: int, gen) -> torch.Tensor:
    """(N, width - 1) per-token log-probs, after the causal shift, whose completion positions
    1..n (shifted: 0..n-1) add up to `summed` and are 0 elsewhere."""
    rows = torch.zeros(len(summed), width - 1)
    for i, (total, n) in enumerate(zip(summed.tolist(), lengths.tolist(), strict=True)):
        parts = torch.rand(n, generator=gen) + 0.1
        rows[i, :n] = total * parts / parts.sum()
    return rows


def completion_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """(N, width): a one-token prompt, then n completion tokens, then padding."""
    positions = torch.arange(width)[None, :]
    return ((positions >= 1) & (positions <= lengths[:, None])).long()


# ------------------------------------------------------------------ IPO


def trl_ipo_loss(pc, pr, rc, rr, n_c, n_r, beta):
    """TRL's `DPOTrainer._compute_loss`, loss_type "ipo", reference log-probs precomputed; the
    policy's per-token log-probs spread each sum over that response's completion tokens."""
    gen = torch.Generator().manual_seed(0)
    lengths = torch.cat([n_c, n_r])
    width = int(lengths.max()) + 2
    log_probs = per_token(torch.cat([pc, pr]), lengths, width, gen)  # (2B, width - 1)
    return trl_dpo_compute_loss(log_probs, completion_mask(lengths, width), rc, rr, beta, "ipo")


def test_ipo_by_hand():
    """pi_c = -4, ref_c = -6 over n_c = 2 tokens: 2 / 2 = 1; pi_r = -9, ref_r = -8 over n_r = 4:
    -1 / 4 = -0.25; h = 1.25. beta = 0.5: target 1 / (2 * 0.5) = 1, L = 0.25^2 = 0.0625.
    beta = 0.25: target 2, L = (-0.75)^2 = 0.5625. Rewards: beta * (2, -1)."""
    args = [torch.tensor([x]) for x in (-4.0, -9.0, -6.0, -8.0)]
    lengths = torch.tensor([2]), torch.tensor([4])
    loss, chosen, rejected = ipo_loss(*args, *lengths, beta=0.5)
    assert loss.item() == pytest.approx(0.0625, abs=1e-6)
    assert (chosen.item(), rejected.item()) == pytest.approx((1.0, -0.5))
    assert ipo_loss(*args, *lengths, beta=0.25)[0].item() == pytest.approx(0.5625, abs=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_matches_trl(beta):
    gen = torch.Generator().manual_seed(5)
    pc, pr, rc, rr = (-5 * torch.rand(6, generator=gen) for _ in range(4))
    n_c, n_r = (torch.randint(1, 6, (6,), generator=gen) for _ in range(2))
    assert not torch.equal(n_c, n_r)  # the per-token average matters
    expected, logged = trl_ipo_loss(pc, pr, rc, rr, n_c, n_r, beta)
    losses, chosen, rejected = ipo_loss(pc, pr, rc, rr, n_c, n_r, beta)
    assert losses.mean().item() == pytest.approx(expected.item(), rel=1e-5)
    assert chosen.mean().item() == pytest.approx(logged["rewards/chosen"][0], abs=1e-6)
    assert rejected.mean().item() == pytest.approx(logged["rewards/rejected"][0], abs=1e-6)
    assert (chosen > rejected).float().mean().item() == pytest.approx(logged["rewards/accuracies"][0])


# ------------------------------------------------------------------ SimPO (TRL's CPO trainer)


def cpo_trainer(beta, gamma, label_smoothing=0.0, cpo_alpha=0.0):
    return SimpleNamespace(
        accelerator=Accelerator(),
        beta=beta,
        label_smoothing=label_smoothing,
        loss_type="simpo",
        simpo_gamma=gamma,
        cpo_alpha=cpo_alpha,
        alpha=0.0,
        aux_loss_enabled=False,
    )


def test_simpo_by_hand():
    """avg_c = -1, avg_r = -2, beta = 2, gamma = 0.5: z = 2 * 1 - 0.5 = 1.5,
    L = log(1 + e^-1.5) = 0.20141; with eps = 0.1: 0.9 * 0.20141 + 0.1 * log(1 + e^1.5) = 0.35141;
    cpo_alpha = 0.5 adds 0.5 * 1 (the chosen NLL per token). Rewards 2 * (-1, -2)."""
    c, r = torch.tensor([-1.0]), torch.tensor([-2.0])
    loss, chosen, rejected = simpo_loss(c, r, beta=2.0, gamma=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1.5)), abs=1e-6)
    assert (chosen.item(), rejected.item()) == pytest.approx((-2.0, -4.0))
    smoothed = simpo_loss(c, r, beta=2.0, gamma=0.5, label_smoothing=0.1)[0].item()
    expected = 0.9 * math.log(1 + math.exp(-1.5)) + 0.1 * math.log(1 + math.exp(1.5))
    assert smoothed == pytest.approx(expected, abs=1e-6)
    with_nll = simpo_loss(c, r, beta=2.0, gamma=0.5, cpo_alpha=0.5)[0].item()
    assert with_nll == pytest.approx(math.log(1 + math.exp(-1.5)) + 0.5, abs=1e-6)


@pytest.mark.parametrize(
    ("beta", "gamma", "eps", "alpha"), [(2.0, 0.5, 0.0, 0.0), (2.5, 1.4, 0.0, 0.0), (1.0, 0.3, 0.2, 1.0)]
)
def test_simpo_matches_trl(beta, gamma, eps, alpha):
    """TRL's `CPOTrainer.cpo_loss` (loss_type "simpo") per pair, and `get_batch_loss_metrics`:
    mean loss + cpo_alpha * NLL, with TRL's NLL given as the mean of ours (-avg(c))."""
    from trl.experimental.cpo import CPOTrainer

    gen = torch.Generator().manual_seed(6)
    c, r = -3 * torch.rand(7, generator=gen), -3 * torch.rand(7, generator=gen)
    trainer = cpo_trainer(beta, gamma, eps, alpha)
    expected, trl_chosen, trl_rejected = CPOTrainer.cpo_loss(trainer, c, r)
    losses, chosen, rejected = simpo_loss(c, r, beta, gamma, eps, alpha)
    torch.testing.assert_close(losses + alpha * c, expected)  # the preference term, pair by pair
    torch.testing.assert_close((chosen, rejected), (trl_chosen, trl_rejected))
    nll = (-c).mean()
    trainer.concatenated_forward = lambda model, batch: (c, r, torch.zeros(1), torch.zeros(1), nll)
    trainer.cpo_loss = lambda *a: CPOTrainer.cpo_loss(trainer, *a)
    total, logged = CPOTrainer.get_batch_loss_metrics(trainer, None, {})
    assert losses.mean().item() == pytest.approx(total.item(), abs=1e-6)
    assert (chosen - rejected).mean().item() == pytest.approx(logged["rewards/margins"], abs=1e-6)


def test_average_logprobs_match_trl_get_batch_logps(llama_dir):
    """SimPO, ORPO and IPO read log-probs averaged over each response's completion tokens: ours from
    chunked hidden states and target counts, TRL's `get_batch_logps(average_log_prob=True)` from
    the full logits (ORPO's and CPO's static methods are the same function)."""
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    texts = ["the quick brown fox jumps", "a lazy dog", "one two three four five six"]
    ids = [tokenizer(t)["input_ids"] for t in texts]
    batch = pad_batch([TokenizedExample(x, [-100] * 2 + x[2:]) for x in ids], tokenizer.pad_token_id)
    with torch.no_grad():
        ours = average_logprobs(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for trainer in (CPOTrainer, ORPOTrainer):
        expected = trainer.get_batch_logps(logits, batch["labels"], average_log_prob=True)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ ORPO


def test_orpo_by_hand():
    """avg_c = log 0.5, avg_r = log 0.2: odds 1 and 0.25, log odds ratio log 4; beta = 0.1:
    L = -log 0.5 - 0.1 log sigma(log 4) = 0.69315 - 0.1 log 0.8 = 0.71546; rewards 0.1 * avg."""
    c, r = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.2)])
    loss, chosen, rejected, log_odds = orpo_loss(c, r, beta=0.1)
    assert log_odds.item() == pytest.approx(math.log(4), abs=1e-6)
    assert loss.item() == pytest.approx(math.log(2) - 0.1 * math.log(0.8), abs=1e-6)
    assert (chosen.item(), rejected.item()) == pytest.approx((0.1 * math.log(0.5), 0.1 * math.log(0.2)))
    x = torch.tensor([-1e-4, -0.5, -0.7, -3.0, -30.0])
    torch.testing.assert_close(log1mexp(x), torch.log1p(-torch.exp(x.double())).float(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("beta", [0.1, 0.25])
def test_orpo_matches_trl(beta):
    """TRL's `ORPOTrainer.odds_ratio_loss` (its losses are beta log sigma(log odds)) and
    `get_batch_loss_metrics`: nll - mean(losses), with TRL's NLL given as the mean of ours."""
    from trl.experimental.orpo import ORPOTrainer

    gen = torch.Generator().manual_seed(8)
    c, r = -3 * torch.rand(7, generator=gen), -3 * torch.rand(7, generator=gen)
    trainer = SimpleNamespace(accelerator=Accelerator(), beta=beta, aux_loss_enabled=False)
    trl_losses, trl_chosen, trl_rejected, trl_ratio, trl_log_odds = ORPOTrainer.odds_ratio_loss(trainer, c, r)
    losses, chosen, rejected, log_odds = orpo_loss(c, r, beta)
    torch.testing.assert_close(losses, -c - trl_losses)
    torch.testing.assert_close((chosen, rejected), (trl_chosen, trl_rejected))
    assert log_odds.mean().item() == pytest.approx(trl_log_odds.item(), abs=1e-6)
    nll = (-c).mean()
    trainer.concatenated_forward = lambda model, batch: (c, r, torch.zeros(1), torch.zeros(1), nll)
    trainer.odds_ratio_loss = lambda *a: ORPOTrainer.odds_ratio_loss(trainer, *a)
    trainer.store_metrics = lambda *a, **k: None
    total, _ = ORPOTrainer.get_batch_loss_metrics(trainer, None, {})
    assert losses.mean().item() == pytest.approx(total.item(), abs=1e-6)


# ------------------------------------------------------------------ KTO


def trl_kto_loss(policy, ref, labels, kl_policy, kl_ref, beta, dw, uw):
    """TRL's `KTOTrainer._compute_loss` (loss_type "kto", reference log-probs precomputed): the
    stand-in model returns per-token log-probs spread over each completion, the main rows'
    or the KL rows' by their width."""
    from trl.trainer.kto_trainer import KTOTrainer

    gen = torch.Generator().manual_seed(1)
    n = len(policy)
    lengths = torch.randint(1, 4, (n,), generator=gen)
    width, kl_width = 6, 7
    main = per_token(policy, lengths, width, gen)
    kl = per_token(kl_policy, lengths.roll(1), kl_width, gen)

    def model(**kwargs):
        rows = main if kwargs["input_ids"].shape[1] == width else kl
        return SimpleNamespace(
            log_probs=rows, entropy=torch.zeros_like(rows), mean_logits=torch.zeros_like(rows)
        )

    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=Accelerator(),
        calculate_KL=True,
        precompute_ref_logps=True,
        aux_loss_enabled=False,
        loss_type="kto",
        beta=beta,
        desirable_weight=dw,
        undesirable_weight=uw,
        _metrics=metrics(),
        _total_train_tokens=0,
        _tp_size=1,
    )
    trainer._compute_kl_logps = lambda m, b: KTOTrainer._compute_kl_logps(trainer, m, b)
    inputs = {
        "input_ids": torch.zeros(n, width, dtype=torch.long),
        "attention_mask": torch.ones(n, width, dtype=torch.long),
        "completion_mask": completion_mask(lengths, width),
        "KL_input_ids": torch.zeros(n, kl_width, dtype=torch.long),
        "KL_attention_mask": torch.ones(n, kl_width, dtype=torch.long),
        "KL_completion_mask": completion_mask(lengths.roll(1), kl_width),
        "label": labels,
        "ref_logps": ref,
        "ref_KL_logps": kl_ref,
    }
    loss = KTOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, trainer._metrics["train"]


def test_kto_by_hand():
    """beta = 1, z0 = max(0, ((-1 - -2) + (-3 - -2)) / 2) = 0 -> with KL logratios (1, 3): z0 = 2.
    Desirable r = 2 at z0 = 2: 1 - sigma(0) = 0.5, weighted 1.5 -> 0.75. Undesirable r = 0:
    1 - sigma(2 - 0) = 0.11920, weighted 1 -> 0.11920. A negative KL estimate is clamped to 0."""
    assert kto_reference_point(torch.tensor(-1.0 + 1.0 - 1.0), 2).item() == 0.0
    z0 = kto_reference_point(torch.tensor(1.0 + 3.0), 2)
    assert z0.item() == pytest.approx(2.0)
    losses, rewards = kto_loss(
        torch.tensor([-1.0, -5.0]),
        torch.tensor([-3.0, -5.0]),
        torch.tensor([True, False]),
        z0,
        beta=1.0,
        desirable_weight=1.5,
    )
    torch.testing.assert_close(losses, torch.tensor([0.75, 1 - 1 / (1 + math.exp(-2))]))
    torch.testing.assert_close(rewards, torch.tensor([2.0, 0.0]))


@pytest.mark.parametrize(("beta", "dw", "uw", "kl_shift"), [(0.1, 1.0, 1.0, 0.5), (0.5, 1.33, 0.8, -0.5)])
def test_kto_matches_trl(beta, dw, uw, kl_shift):
    """kl_shift moves the policy's KL-row log-probs above (z0 > 0) or below (z0 clamped to 0) the
    reference's."""
    gen = torch.Generator().manual_seed(10)
    n = 8
    policy, ref, kl_ref = (-6 * torch.rand(n, generator=gen) for _ in range(3))
    kl_policy = kl_ref + kl_shift + 0.3 * torch.randn(n, generator=gen)
    labels = torch.tensor([True, False, True, True, False, False, True, False])
    expected, logged = trl_kto_loss(policy, ref, labels, kl_policy, kl_ref, beta, dw, uw)
    z0 = kto_reference_point((kl_policy - kl_ref).sum(), n)
    assert z0.item() == pytest.approx(logged["kl"][0], abs=1e-5)
    assert (z0.item() > 0) == (kl_shift > 0)
    losses, rewards = kto_loss(policy, ref, labels, z0, beta, dw, uw)
    assert losses.mean().item() == pytest.approx(expected.item(), abs=1e-6)
    assert rewards[labels].mean().item() == pytest.approx(logged["rewards/chosen"][0], abs=1e-5)
    assert rewards[~labels].mean().item() == pytest.approx(logged["rewards/rejected"][0], abs=1e-5)


def test_kto_gradient_does_not_flow_through_the_reference_point():
    """z0 is a constant of the step: d L / d log pi comes from r(x, y) alone."""
    policy = torch.tensor([-1.0, -2.0], requires_grad=True)
    kl_sum = (policy * 0 + 1).sum()  # z0 = 2 / 2 = 1; depends on the policy, but z0 detaches it
    losses, _ = kto_loss(policy, torch.zeros(2), torch.tensor([True, False]), kto_reference_point(kl_sum, 2))
    losses.sum().backward()
    r = policy.detach() - 1.0  # r(x, y) - z0, z0 = 2 / 2
    s = torch.sigmoid(0.1 * r)
    expected = torch.tensor([-0.1 * s[0] * (1 - s[0]), 0.1 * s[1] * (1 - s[1])])
    torch.testing.assert_close(policy.grad, expected)


# ------------------------------------------------------------------ KTO's unpaired data


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_unpaired_example_tokenises_like_one_side_of_a_pair(tiny_tokenizer, template):
    """prompt + completion of an unpaired example = the chosen side of the same preference pair,
    ids and labels; the split falls where the completion's targets start."""
    from tunelab.data.preference import encode_pair, to_preference_pair
    from tunelab.data.unpaired import encode_unpaired, row, to_unpaired

    fields = {
        "prompt": "Reverse the words.\n\nred owl sun",
        "instruction": "Reverse the words.",
        "input": "x",
    }
    pair = encode_pair(
        to_preference_pair({**fields, "chosen": "sun owl red", "rejected": "7"}, "f", 1),
        tiny_tokenizer,
        template,
        512,
    )
    example = encode_unpaired(
        to_unpaired({**fields, "completion": "sun owl red", "label": True}, "f", 1), tiny_tokenizer, template
    )
    assert example.desirable and example.prompt_ids and example.completion_labels[0] != -100
    whole = row(example, example, 512)
    assert (whole.input_ids, whole.labels) == (pair.chosen.input_ids, pair.chosen.labels)
    assert set(whole.labels[: len(example.prompt_ids)]) == {-100}


def test_unpaired_labels_and_chat_records():
    """A label is a boolean, or in a CSV cell the text true/false; messages are accepted as TRL's
    conversational unpaired format has them; a system prompt goes first."""
    from tunelab.data.unpaired import to_unpaired
    from tunelab.errors import DataError

    assert to_unpaired({"prompt": "a", "completion": "b", "label": " True"}, "f.csv", 2).desirable is True
    assert to_unpaired({"prompt": "a", "completion": "b", "label": "false"}, "f.csv", 2).desirable is False
    with pytest.raises(DataError, match="record 3, field 'label': expected true or false, got 1"):
        to_unpaired({"prompt": "a", "completion": "b", "label": 1}, "f.jsonl", 3)
    chat = {
        "prompt": [{"role": "user", "content": "hi"}],
        "completion": [{"role": "assistant", "content": "hello"}],
        "label": False,
    }
    record = to_unpaired(chat, "f.jsonl", 1, system_prompt="Be brief.")
    assert record.prompt == [("system", "Be brief."), ("user", "hi")]
    assert record.completion == [("assistant", "hello")] and record.desirable is False
    with pytest.raises(DataError, match="field 'completion\\[0\\].role'"):
        to_unpaired({**chat, "completion": [{"role": "user", "content": "x"}]}, "f.jsonl", 1)


def test_a_preference_pair_is_unpaired(tiny_tokenizer, tmp_path):
    """A `kto` data file may hold pairs: each gives its chosen completion (desirable) and its
    rejected one (undesirable), with the pair's prompt and template fields; unpaired records in the
    same file are read as they are. `data.format: preference` is accepted, `chat` is not."""
    from tunelab.config import DataConfig
    from tunelab.data.unpaired import prepare_unpaired, row
    from tunelab.errors import DataError

    records = [
        {
            "prompt": "Count.\n\nred owl",
            "instruction": "Count.",
            "input": "red owl",
            "chosen": "2",
            "rejected": "3",
        },
        {"prompt": "Say hi.", "completion": "hi", "label": True},
    ]
    source = tmp_path / "mixed.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    for fmt in ("auto", "preference"):
        data = prepare_unpaired(DataConfig(train=str(source), template="alpaca", format=fmt), tiny_tokenizer)
        assert [e.desirable for e in data.train] == [True, False, True]
        first, second = (row(e, e, 64) for e in data.train[:2])
        decode = tiny_tokenizer.decode
        assert data.train[0].prompt_ids == data.train[1].prompt_ids and "### Input:" in decode(
            first.input_ids
        )
        eos = tiny_tokenizer.eos_token
        targets = [decode([t for t in r.labels if t != -100]) for r in (first, second)]
        assert targets == ["2" + eos, "3" + eos]
    with pytest.raises(DataError, match="reads unpaired .* but data.format is 'chat'"):
        prepare_unpaired(DataConfig(train=str(source), template="alpaca", format="chat"), tiny_tokenizer)


def test_mismatched_rows_take_the_previous_completion(tiny_tokenizer):
    """TRL's rotation (x_1, y_n), (x_2, y_1), ...; a row is cut to max_length; the batch holds the
    matched rows, the mismatched rows and the labels."""
    from tunelab.data.unpaired import UnpairedExample, mismatched_partners, pad_unpaired, row

    assert mismatched_partners([5, 7, 9]) == [9, 5, 7]
    a = UnpairedExample([1, 2, 3], [10, 11], [10, 11], True)
    b = UnpairedExample([4], [12, 13, 14], [12, -100, 14], False)
    assert (row(a, b, 16).input_ids, row(a, b, 16).labels) == (
        [1, 2, 3, 12, 13, 14],
        [-100] * 3 + [12, -100, 14],
    )
    cut = row(a, b, 4)
    assert (cut.input_ids, cut.truncated, cut.num_targets) == ([1, 2, 3, 12], True, 1)
    batch = pad_unpaired([a, b], [b, a], pad_id=0, max_length=16)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 10, 11], [4, 12, 13, 14, 0]]
    assert batch["kl_input_ids"].tolist() == [[1, 2, 3, 12, 13, 14], [4, 10, 11, 0, 0, 0]]
    assert batch["kl_labels"][1].tolist() == [-100, 10, 11, -100, -100, -100]
    assert batch["desirable"].tolist() == [True, False]


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"loss": "ipo", "label_smoothing": 0.1}, "label_smoothing applies to loss sigmoid or simpo"),
        ({"loss": "sigmoid", "cpo_alpha": 1.0}, "cpo_alpha applies to loss simpo"),
        ({"loss": "kto"}, "objective.loss"),
    ],
)
def test_dpo_loss_options_are_checked(options, problem):
    from tunelab.config import load_config
    from tunelab.errors import ConfigError

    with pytest.raises(ConfigError, match=problem):
        load_config(None, [], model={"name_or_path": "m"}, objective={"name": "dpo", **options})


@pytest.mark.parametrize("world", [1, 2])
def test_kto_steps_pair_each_prompt_with_the_previous_completion_of_the_step(world):
    """The training batches of `kto`: over a step's micro-batches in global order (i_1, ..., i_m),
    example i_k's mismatched row is (x_{i_k}, y_{i_{k-1}}), y_{i_m} for the first, across micro-batch
    boundaries; with 2 processes each takes its rows with their global partners."""
    from tunelab.data.collate import epoch_batches
    from tunelab.data.unpaired import UnpairedExample
    from tunelab.objectives.kto import kto_steps
    from tunelab.training.distributed import Parallel

    examples = [
        UnpairedExample([100 + i], [200 + i, 300 + i], [200 + i, 300 + i], i % 3 == 0) for i in range(10)
    ]
    config = SimpleNamespace(
        train=SimpleNamespace(seed=4, grad_accum=2),
        data=SimpleNamespace(group_by_length=False, max_length=64),
    )
    step_order = [i for indices in epoch_batches([3] * 10, 6, 4, 0) for i in indices]  # batches of 6 and 4
    partner = dict(zip(step_order, step_order[-1:] + step_order[:-1], strict=True))
    seen = []
    for rank in range(world):
        run = SimpleNamespace(
            config=config,
            global_batch=6,
            dist=Parallel(rank=rank, world_size=world),
            tokenizer=SimpleNamespace(pad_token_id=0),
            device=torch.device("cpu"),
        )
        micro_batches = next(kto_steps(run, examples, position=0))
        assert [b.units for b in micro_batches] == [6 // world, 4 // world]
        for micro_batch in micro_batches:
            batch = micro_batch.tensors
            for row, i in enumerate(micro_batch.examples):
                assert batch["input_ids"][row].tolist()[:3] == [100 + i, 200 + i, 300 + i]
                assert batch["kl_input_ids"][row].tolist()[:3] == [
                    100 + i,
                    200 + partner[i],
                    300 + partner[i],
                ]
                assert bool(batch["desirable"][row]) == (i % 3 == 0)
            seen += micro_batch.examples
    assert sorted(seen) == sorted(step_order) == list(range(10))


def test_kto_data_take_the_configured_chat_template(tiny_tokenizer, tmp_path):
    """`data.chat_template` replaces the tokenizer's for KTO's examples too."""
    import copy

    from tunelab.config import DataConfig
    from tunelab.data.unpaired import prepare_unpaired

    source = tmp_path / "kto.jsonl"
    source.write_text(json.dumps({"prompt": "Say hi.", "completion": "hi", "label": True}) + "\n")
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    tokenizer = copy.deepcopy(tiny_tokenizer)
    cfg = DataConfig(train=str(source), template="chat", chat_template=template, cache_dir=None)
    data = prepare_unpaired(cfg, tokenizer)
    assert tokenizer.chat_template == template
    assert tokenizer.decode(data.train[0].prompt_ids).startswith("<user>Say hi.")

"""IPO, SimPO and ORPO (the `dpo` objective's `loss`) and the `kto` objective, end to end on a tiny
model and the bundled preference data: training raises the held-out margin and pairwise accuracy;
SimPO and ORPO never build or run a reference policy; KTO starts at loss 1/2 with z0 = 0, its steps
do not depend on the split into micro-batches, it reads preference pairs as well as unpaired
examples, and a bad record is one line naming the file, the record and the field, before the model
loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tunelab
from tests.helpers import rlhf_config
from tunelab.errors import DataError
from tunelab.objectives import dpo
from tunelab.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
PAIRS = ROOT / "data" / "rlhf" / "preference_train.jsonl"
HELD_OUT = ROOT / "data" / "rlhf" / "preference_eval.jsonl"
TRAIN = {"max_steps": 15, "batch_size": 16, "lr": 1e-3, "log_every": 1, "eval_batches": 5}


def unpair(source: Path, target: Path) -> Path:
    """TRL's unpaired form of preference pairs: each pair gives its chosen completion labelled true
    and its rejected one labelled false (the other fields are kept for the template)."""
    rows = []
    for line in source.read_text().splitlines():
        pair = json.loads(line)
        common = {k: v for k, v in pair.items() if k not in ("chosen", "rejected")}
        rows.append({**common, "completion": pair["chosen"], "label": True})
        rows.append({**common, "completion": pair["rejected"], "label": False})
    target.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return target


@pytest.fixture(scope="module")
def unpaired_data(tmp_path_factory):
    """(train, eval) unpaired files made from the bundled preference pairs: 2,000 and 400 examples."""
    root = tmp_path_factory.mktemp("unpaired")
    return unpair(PAIRS, root / "train.jsonl"), unpair(HELD_OUT, root / "eval.jsonl")


def no_reference(*args, **kwargs):
    raise AssertionError("a reference-free loss built or ran a reference policy")


@pytest.mark.parametrize(
    ("loss", "options", "overrides"),
    [
        ("ipo", {"beta": 0.1}, []),
        ("simpo", {"beta": 2.0, "simpo_gamma": 0.5}, []),
        ("orpo", {"beta": 2.0}, ["train.lr=3e-3"]),
    ],
)
def test_pairwise_loss_raises_the_held_out_margin(llama_dir, tmp_path, monkeypatch, loss, options, overrides):
    """15 steps of full fine-tuning raise the held-out implicit-reward margin and take the pairwise
    accuracy above chance (measured: ipo 0 -> 0.067 and 0.64, simpo 0.028 -> 0.37 and 0.68, orpo
    0.028 -> 0.33 and 0.73). SimPO and ORPO run with the reference policy made unavailable."""
    if loss in dpo.REFERENCE_FREE:
        monkeypatch.setattr(dpo, "Reference", no_reference)
        monkeypatch.setattr(dpo, "reference_sequence_logprobs", no_reference)
    objective = {"name": "dpo", "loss": loss, **options}
    out = tmp_path / loss
    config = rlhf_config(llama_dir, out, overrides, objective, PAIRS, HELD_OUT, None, TRAIN)
    summary = tunelab.train(config)
    assert summary["eval_margin"] > summary["eval_margin_before"] + 0.03
    assert summary["eval_accuracy"] > 0.58 and summary["eval_accuracy"] > summary["eval_accuracy_before"]
    if loss == "ipo":  # the policy starts as the reference: h = 0, L = (1 / (2 beta))^2 = 25
        assert read_metrics(out)[0]["loss"] == pytest.approx(25.0, abs=1e-4)


def test_kto_raises_the_held_out_margin(llama_dir, tmp_path, unpaired_data):
    """At the first step the policy is the reference: every reward and z0 are 0, so every example's
    loss is 1 - sigma(0) = 1/2. 15 steps raise the held-out margin between the mean rewards of
    desirable and undesirable completions (measured 0 -> 0.14)."""
    out = tmp_path / "kto"
    config = rlhf_config(llama_dir, out, [], {"name": "kto", "beta": 0.1}, *unpaired_data, None, TRAIN)
    summary = tunelab.train(config)
    assert summary["eval_margin_before"] == pytest.approx(0.0, abs=1e-6)
    assert summary["eval_margin"] > 0.05
    rows = read_metrics(out)
    assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-6) and rows[0]["kl"] == 0.0
    assert rows[-1]["kl"] > 0  # the policy moved away from the reference
    assert {"reward_desirable", "reward_undesirable", "reward_margin", "desirable_share"} <= set(rows[0])


def test_kto_accumulation_invariance(llama_dir, tmp_path):
    """batch 8 x accumulation 1 takes the same steps as batch 2 x accumulation 4: z0 and the
    mismatched rows are those of the whole step, and the loss is averaged over its examples. The
    data are the bundled preference pairs, which `kto` unpairs itself (as TRL's KTO trainer does)."""
    common = ["train.max_steps=3", "train.lr=1e-2"]
    for name, split in (("a", ["train.batch_size=8"]), ("b", ["train.batch_size=2", "train.grad_accum=4"])):
        tunelab.train(rlhf_config(llama_dir, tmp_path / name, common + split, {"name": "kto"}, PAIRS))
    a, b = (read_metrics(tmp_path / name) for name in ("a", "b"))
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-4)
    assert [r["kl"] for r in a] == pytest.approx([r["kl"] for r in b], rel=1e-4, abs=1e-6)
    assert a[-1]["kl"] > 0 and a[-1]["loss"] != pytest.approx(a[0]["loss"], abs=1e-4)


@pytest.mark.parametrize(
    ("record", "field", "problem"),
    [
        ({"prompt": "a", "completion": "b", "label": "yes"}, "label", "expected true or false"),
        ({"prompt": "a", "completion": "b"}, "label", "missing field"),
        ({"prompt": "a", "completion": "", "label": True}, "completion", "is empty"),
        ({"prompt": "a", "completion": 3, "label": False}, "completion", "expected a string"),
        ({"prompt": "a", "chosen": "b"}, "rejected", "missing field"),
    ],
)
def test_a_bad_kto_record_is_one_line_before_the_model_loads(
    llama_dir, tmp_path, monkeypatch, record, field, problem
):
    from tunelab.objectives import kto

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data were checked")

    monkeypatch.setattr(kto, "setup_run", no_model)  # the run's set-up loads the model
    bad = tmp_path / "bad.jsonl"
    good = {"prompt": "What is 2 plus 2?", "completion": "4", "label": True}
    bad.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    config = rlhf_config(llama_dir, tmp_path / "r", [], {"name": "kto"}, bad)
    with pytest.raises(DataError) as error:
        tunelab.train(config)
    message = str(error.value)
    assert "\n" not in message and str(bad) in message and "record 2" in message
    assert f"field '{field}'" in message and problem in message

"""Reward-model recipe on a tiny model: beats chance on held-out pairs (full and LoRA), the saved
model loads for scoring (`tunelab score`), margins, and exact resume with the head in checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import tunelab
from tests.helpers import rlhf_config
from tunelab.cli import main
from tunelab.rl.reward_model import CONFIG_FILE, HEAD_FILE, load_reward_model
from tunelab.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
PAIRS = ROOT / "data" / "rlhf" / "preference_train.jsonl"
HELD_OUT = ROOT / "data" / "rlhf" / "preference_eval.jsonl"
LORA = {"name": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear"}


def reward_config(
    model_dir, output_dir, *overrides, method=None, train=PAIRS, eval_file=HELD_OUT, **objective
):
    train_section = {"max_steps": 60, "batch_size": 16, "lr": 1e-3, "log_every": 1}
    objective = {"name": "reward", **objective}
    return rlhf_config(model_dir, output_dir, overrides, objective, train, eval_file, method, train_section)


@pytest.mark.parametrize(("method", "lr"), [({"name": "full"}, 1e-3), (LORA, 3e-3)], ids=["full", "lora"])
def test_reward_model_beats_chance_and_loads_for_scoring(llama_dir, tmp_path, capsys, method, lr):
    """60 steps of 16 pairs: held-out pairwise accuracy (200 pairs) well above chance; the saved
    model (method artifact + head) scores the held-out pairs the same through `tunelab score`."""
    out = tmp_path / "rm"
    summary = tunelab.train(reward_config(llama_dir, out, f"train.lr={lr}", method=method))
    assert summary["eval_accuracy"] >= 0.6 > summary["eval_accuracy_before"] + 0.02
    rows = read_metrics(out)
    assert len(rows) == 60 and all({"step", "loss", "accuracy", "margin"} <= set(r) for r in rows)
    final = out / "final"
    assert (final / HEAD_FILE).is_file() and json.loads((final / CONFIG_FILE).read_text())[
        "template"
    ] == "alpaca"
    artifact = "adapter_config.json" if method["name"] == "lora" else "config.json"
    assert (final / artifact).is_file()
    capsys.readouterr()
    assert main(["score", str(out), "--data", str(HELD_OUT), "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 201 and set(json.loads(lines[0])) == {"record", "chosen", "rejected"}
    scored = json.loads(lines[-1])["summary"]
    assert scored["pairs"] == 200
    assert scored["accuracy"] == pytest.approx(summary["eval_accuracy"], abs=0.011)
    assert scored["mean_margin"] == pytest.approx(summary["eval_margin"], abs=1e-3)


def test_score_one_response_and_responses_file(llama_dir, tmp_path, capsys):
    out = tmp_path / "rm"
    tunelab.train(reward_config(llama_dir, out, "train.max_steps=2", eval_file=None))
    reward_model = load_reward_model(out, device="cpu")
    assert not any(p.requires_grad for p in reward_model.model.parameters())
    capsys.readouterr()
    assert (
        main(["score", str(out), "--prompt", "What is 2 plus 3?", "--response", "5", "--device", "cpu"]) == 0
    )
    assert math.isfinite(float(capsys.readouterr().out))
    responses = tmp_path / "responses.jsonl"
    rows = [
        {"prompt": "What is 2 plus 3?", "response": "5"},
        {"prompt": "What is 2 plus 3?", "completion": "6"},
    ]
    responses.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["score", str(out), "--data", str(responses), "--device", "cpu"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [line.get("record") for line in lines[:2]] == [1, 2] and lines[2]["summary"]["records"] == 2
    assert main(["score", str(tmp_path / "nothing"), "--prompt", "a", "--response", "b"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_margins_from_the_data_enter_the_loss(llama_dir, tmp_path):
    """With a margin m = 5 on every pair the first loss is about -log sigma(-5) = 5.0 instead of log 2."""
    rows = [json.loads(line) for line in PAIRS.read_text().splitlines()[:32]]
    plain, margined = tmp_path / "plain.jsonl", tmp_path / "margin.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows))
    margined.write_text("".join(json.dumps({**r, "margin": 5.0}) + "\n" for r in rows))
    tunelab.train(reward_config(llama_dir, tmp_path / "a", "train.max_steps=1", train=plain, eval_file=None))
    tunelab.train(
        reward_config(llama_dir, tmp_path / "b", "train.max_steps=1", train=margined, eval_file=None)
    )
    first_plain, first_margin = (
        read_metrics(tmp_path / "a")[0]["loss"],
        read_metrics(tmp_path / "b")[0]["loss"],
    )
    assert first_plain == pytest.approx(math.log(2), abs=0.1)
    assert first_margin == pytest.approx(-torch.nn.functional.logsigmoid(torch.tensor(-5.0)).item(), abs=0.2)


def test_resume_equals_no_stop(llama_dir, tmp_path):
    """The reward head is a trainable parameter of the model: checkpoints hold it and a resumed run
    continues exactly."""
    common = ["train.max_steps=6", "train.save_every=3", "train.batch_size=8"]
    tunelab.train(reward_config(llama_dir, tmp_path / "full", *common, eval_file=None))
    from tunelab.training import loop

    original = loop.MetricsLog.log

    def log(self, row):
        original(self, row)
        if row["step"] >= 4:
            raise KeyboardInterrupt

    loop.MetricsLog.log = log
    try:
        with pytest.raises(KeyboardInterrupt):
            tunelab.train(reward_config(llama_dir, tmp_path / "cut", *common, eval_file=None))
    finally:
        loop.MetricsLog.log = original
    tunelab.train(reward_config(llama_dir, tmp_path / "cut", *common, "train.resume=true", eval_file=None))
    straight = [r["loss"] for r in read_metrics(tmp_path / "full")]
    resumed = [r["loss"] for r in read_metrics(tmp_path / "cut")]
    assert resumed == pytest.approx(straight, rel=1e-6)

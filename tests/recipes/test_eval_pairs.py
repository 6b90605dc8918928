"""`tunelab eval` on preference pairs: a DPO run's own held-out figures again (LoRA: the adapter
switched off is pi_ref; full: the start loaded again), the log-prob ranking against plain forwards
of each unpadded sequence, a run's `data.eval_fraction` split drawn again (pairs and SFT), and
the errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import tunelab
from tests.helpers import rlhf_config, run_in_process, sft_config
from tunelab.config import to_plain
from tunelab.data.preference import prepare_preferences
from tunelab.runinfo import run_config
from tunelab.trained import load_trained

ROOT = Path(__file__).resolve().parents[2]
PAIRS = ROOT / "data" / "rlhf" / "preference_train.jsonl"
HELD_OUT = ROOT / "data" / "rlhf" / "preference_eval.jsonl"
LORA = {"name": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear"}


def held_out_file(tmp_path: Path, count: int) -> Path:
    path = tmp_path / "held_out.jsonl"
    path.write_text("".join(HELD_OUT.read_text().splitlines(keepends=True)[:count]))
    return path


def train_dpo(llama_dir, out: Path, eval_file: Path, method: dict, loss: str = "sigmoid") -> dict:
    train = {"max_steps": 6, "batch_size": 8, "lr": 3e-3, "log_every": 1}
    config = rlhf_config(
        llama_dir, out, [], {"name": "dpo", "loss": loss, "beta": 0.1}, PAIRS, eval_file, method, train
    )
    return tunelab.train(config)


def eval_json(capsys, *argv) -> dict:
    outcome = run_in_process(["eval", *argv], capsys)
    assert outcome.code == 0, outcome.err
    return json.loads(outcome.out[outcome.out.index("{") :])


@pytest.mark.parametrize(
    ("method", "loss"), [(LORA, "sigmoid"), ({"name": "full"}, "sigmoid"), (LORA, "simpo")], ids=str
)
def test_eval_of_a_dpo_run_gives_its_held_out_figures(llama_dir, tmp_path, capsys, method, loss):
    """The run's summary holds eval_loss, eval_margin, eval_accuracy after training, computed by the
    training loop; `tunelab eval RUN` computes them again from the saved run alone (a full run's
    reference is its start, loaded again; LoRA's is the adapter switched off; simpo has none)."""
    run = tmp_path / "dpo"
    summary = train_dpo(llama_dir, run, held_out_file(tmp_path, 24), method, loss)
    assert summary["eval_margin"] != pytest.approx(0.0, abs=1e-4)  # trained away from pi_ref
    figures = eval_json(capsys, run, "--batch-size", "5")
    assert figures["pairs"] == 24
    for name in ("eval_loss", "eval_margin", "eval_accuracy"):
        assert figures[name] == pytest.approx(summary[name], rel=1e-4, abs=1e-6), name


def test_ranking_figures_are_plain_forwards_of_each_sequence(llama_dir, instruction_data, tmp_path, capsys):
    """chosen_logp, rejected_logp and ranking_accuracy, from padded batches of pairs, equal sums of
    log-softmax over one plain forward per unpadded sequence (a LoRA policy trained away from its
    base, loaded as a user would)."""
    run = tmp_path / "dpo"
    eval_file = held_out_file(tmp_path, 12)
    train_dpo(llama_dir, run, eval_file, LORA)
    figures = eval_json(capsys, run, "--batch-size", "4")
    model, tokenizer, _ = load_trained(run)
    config = run_config(run)
    pairs = prepare_preferences(config.data, tokenizer).eval
    chosen, rejected = [], []
    with torch.no_grad():
        for pair in pairs:
            for side, into in ((pair.chosen, chosen), (pair.rejected, rejected)):
                ids = torch.tensor([side.input_ids])  # (1, T)
                logp = model(ids).logits.log_softmax(-1)[0]  # (T, V)
                targets = [t for t in range(1, len(side.labels)) if side.labels[t] != -100]
                into.append(float(sum(logp[t - 1, side.input_ids[t]] for t in targets)))
    assert len(pairs) == figures["pairs"] == 12
    assert figures["chosen_logp"] == pytest.approx(sum(chosen) / 12, rel=1e-5)
    assert figures["rejected_logp"] == pytest.approx(sum(rejected) / 12, rel=1e-5)
    ranked = sum(c > r for c, r in zip(chosen, rejected, strict=True)) / 12
    assert figures["ranking_accuracy"] == pytest.approx(ranked)
    assert "eval_loss" in figures
    # A model folder with --data: the ranking only (no run, no reference), on the same pairs.
    plain = eval_json(capsys, llama_dir, "--data", eval_file, "--template", "alpaca", "--max-length", "128")
    assert set(plain) == {"path", "method", "pairs", "chosen_logp", "rejected_logp", "ranking_accuracy"}
    assert plain["chosen_logp"] != pytest.approx(figures["chosen_logp"])  # the base, not the policy
    # The DPO run's policy on instruction records (--data): the per-token loss, as for any model.
    sft_style = eval_json(capsys, run, "--data", instruction_data[1], "--no-generate")
    assert sft_style["records"] == 24 and sft_style["eval_loss"] > 0


def test_a_run_held_out_by_fraction_is_evaluated_on_that_split(llama_dir, tmp_path, capsys):
    """A DPO run with `data.eval_fraction` and no eval file: `tunelab eval RUN` draws the same split
    with the run's seed (the figures equal the run's), and `--limit` caps it."""
    run = tmp_path / "dpo"
    config = rlhf_config(
        llama_dir,
        run,
        ["data.eval_fraction=0.02", "train.seed=3"],
        {"name": "dpo", "beta": 0.1},
        PAIRS,
        None,
        LORA,
        {"max_steps": 4, "batch_size": 8, "lr": 3e-3},
    )
    summary = tunelab.train(config)
    figures = eval_json(capsys, run)
    assert figures["pairs"] == 20  # 2% of 1,000
    assert figures["eval_loss"] == pytest.approx(summary["eval_loss"], rel=1e-4)
    assert eval_json(capsys, run, "--limit", "7")["pairs"] == 7


def test_an_sft_run_held_out_by_fraction_is_evaluated_on_that_split(
    llama_dir, instruction_data, tmp_path, capsys
):
    """The same for SFT: the per-token held-out loss of `tunelab eval RUN` is the run's own."""
    run = tmp_path / "sft"
    config = sft_config(llama_dir, instruction_data[0], run, "data.eval_fraction=0.25", "train.seed=4")
    summary = tunelab.train(config)
    figures = eval_json(capsys, run, "--no-generate")
    assert figures["records"] == 24  # a quarter of 96
    assert figures["eval_loss"] == pytest.approx(summary["eval_loss"], rel=1e-5)


def test_errors_name_what_to_do(llama_dir, tmp_path, capsys):
    """A reward-model run points to `tunelab score`, a run without held-out data to --data; SFT on
    preference pairs names the record and the objectives that read pairs."""
    reward = tmp_path / "reward"
    (reward / "final").mkdir(parents=True)
    config = rlhf_config(llama_dir, reward, [], {"name": "reward"}, PAIRS, HELD_OUT)
    (reward / "config.yaml").write_text(yaml.safe_dump(to_plain(config)))
    outcome = run_in_process(["eval", reward], capsys)
    assert outcome.code != 0 and f"tunelab score {reward}" in outcome.err
    online = tmp_path / "grpo"  # no held-out prompts: nothing to evaluate without --data
    (online / "final").mkdir(parents=True)
    rewards = {"reward_functions": ["tunelab.rl.rewards:one_line"]}
    config = rlhf_config(llama_dir, online, [], {"name": "grpo", **rewards}, PAIRS)
    (online / "config.yaml").write_text(yaml.safe_dump(to_plain(config)))
    outcome = run_in_process(["eval", online], capsys)
    assert outcome.code != 0 and "Traceback" not in outcome.err
    assert "data.eval or data.eval_fraction" in outcome.err and "--data FILE" in outcome.err
    sft = rlhf_config(llama_dir, tmp_path / "sft", ["train.max_steps=1"], {"name": "sft"}, PAIRS)
    with pytest.raises(
        tunelab.errors.DataError, match=r"preference_train.jsonl, record 1: a preference pair"
    ):
        tunelab.train(sft)

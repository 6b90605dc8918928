"""PPO recipe on a tiny model: a programmatic reward rises while KL stays bounded (full and LoRA),
PPO against a trained reward model, the missing-EOS penalty, and exact resume (same rollouts).

The reward, "short and ends with EOS", is learnable in a few steps from a random model: 2 for a
response that ends with EOS, minus its length / 16. The random tiny model puts ~1/V on EOS; the
policy learns to answer with EOS at once, where the KL to the reference is bounded by log V.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import tunelab
from tests.helpers import rlhf_config
from tunelab.config import load_config
from tunelab.tiny import EOS, SPECIAL_TOKENS
from tunelab.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ROOT / "data" / "rlhf" / "prompts_train.jsonl"
HELD_OUT = ROOT / "data" / "rlhf" / "prompts_eval.jsonl"
EOS_ID = SPECIAL_TOKENS.index(EOS)
MAX_NEW_TOKENS = 16
# The random tiny model's LM head is too weak for adapters in the blocks alone to move the output
# distribution; LoRA on the LM head too makes it learnable (pretrained models do not need this).
LORA = {"name": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj", "lm_head"]}
KEYS = {
    "step",
    "loss",
    "reward",
    "kl",
    "entropy",
    "clip_frac",
    "value_loss",
    "response_length",
    "eos_fraction",
}


def short_and_ended(prompts, completions, completion_ids, **_):
    """2 if the response ends with EOS, minus its length / 16."""
    return [2.0 * (len(ids) > 0 and ids[-1] == EOS_ID) - len(ids) / MAX_NEW_TOKENS for ids in completion_ids]


def ppo_config(model_dir, output_dir, *overrides, method=None, eval_file=None, **objective):
    objective = {
        "name": "ppo",
        "reward_functions": [f"{__file__}:short_and_ended"],
        "max_new_tokens": MAX_NEW_TOKENS,
        **objective,
    }
    train = {"max_steps": 20, "batch_size": 16, "lr": 5e-3, "schedule": "constant"}
    eval_section = {"num_examples": 16, "batch_size": 16}
    return rlhf_config(
        model_dir, output_dir, overrides, objective, PROMPTS, eval_file, method, train, eval_section
    )


@pytest.mark.parametrize("method", [{"name": "full"}, LORA], ids=["full", "lora"])
def test_ppo_raises_the_reward_while_kl_stays_bounded(llama_dir, tmp_path, method):
    assert AutoTokenizer.from_pretrained(llama_dir).eos_token_id == EOS_ID
    out = tmp_path / "ppo"
    summary = tunelab.train(ppo_config(llama_dir, out, method=method, eval_file=HELD_OUT))
    rows = read_metrics(out)
    assert len(rows) == 20 and all(KEYS <= set(r) for r in rows)
    rewards = [r["reward"] for r in rows]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 1.0
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the first rollouts come from pi_ref itself
    assert max(r["kl"] for r in rows) < math.log(len(AutoTokenizer.from_pretrained(llama_dir))) + 2.0
    assert summary["eval_reward"] > summary["eval_reward_before"]
    artifact = "adapter_config.json" if method["name"] == "lora" else "config.json"
    assert (out / "final" / artifact).is_file()


def test_ppo_against_a_trained_reward_model(llama_dir, tmp_path):
    """sft -> reward -> ppo: the reward model of the `reward` objective scores PPO's rollouts."""
    tunelab.train(
        load_config(
            None,
            [],
            model={"name_or_path": str(llama_dir)},
            objective={"name": "reward"},
            data={
                "train": str(ROOT / "data/rlhf/preference_train.jsonl"),
                "template": "alpaca",
                "max_length": 128,
            },
            train={"max_steps": 3, "batch_size": 8, "progress": False},
            output_dir=str(tmp_path / "rm"),
        )
    )
    tunelab.train(
        ppo_config(
            llama_dir,
            tmp_path / "ppo",
            "train.max_steps=2",
            "train.batch_size=4",
            method={"name": "adapter", "bottleneck": 8},
            reward_model=str(tmp_path / "rm"),
            reward_functions=[],
        )
    )
    rows = read_metrics(tmp_path / "ppo")
    assert len(rows) == 2 and all(r["reward"] == pytest.approx(r["reward/model"]) for r in rows)
    with pytest.raises(tunelab.errors.TunelabError, match="template 'alpaca'"):
        tunelab.train(
            ppo_config(llama_dir, tmp_path / "x", "data.template=chat", reward_model=str(tmp_path / "rm"))
        )


def test_missing_eos_penalty_and_several_mini_batches(llama_dir, tmp_path):
    tunelab.train(
        ppo_config(
            llama_dir,
            tmp_path / "ppo",
            "train.max_steps=2",
            "train.grad_accum=2",
            missing_eos_penalty=3.0,
            num_mini_batches=2,
            ppo_epochs=2,
            kl_estimator="k3",
            whiten_scores=False,
        )
    )
    for row in read_metrics(tmp_path / "ppo"):
        raw = row["reward/short_and_ended"]
        assert row["reward"] == pytest.approx(raw - 3.0 * (1 - row["eos_fraction"]), abs=1e-5)
        assert row["kl"] >= 0.0  # k3 is never negative


def test_resume_equals_no_stop(llama_dir, tmp_path):
    """The checkpoint holds the value head, the optimizer, the RNG (the next rollouts are the same
    samples) and the data position (the next prompts are the same)."""
    common = ["train.max_steps=4", "train.save_every=2", "train.batch_size=4"]
    tunelab.train(ppo_config(llama_dir, tmp_path / "full", *common))
    from tunelab.training.metrics import MetricsLog

    original = MetricsLog.log

    def log(self, row):
        original(self, row)
        if row["step"] >= 3:
            raise KeyboardInterrupt

    MetricsLog.log = log
    try:
        with pytest.raises(KeyboardInterrupt):
            tunelab.train(ppo_config(llama_dir, tmp_path / "cut", *common))
    finally:
        MetricsLog.log = original
    tunelab.train(ppo_config(llama_dir, tmp_path / "cut", *common, "train.resume=true"))
    straight, resumed = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for key in ("loss", "reward", "kl", "response_length"):
        assert [r[key] for r in resumed] == pytest.approx([r[key] for r in straight], rel=1e-5, abs=1e-6)

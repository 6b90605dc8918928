"""GRPO recipe on a tiny model: a programmatic reward rises while KL stays bounded (full and LoRA),
weighted reward functions, every option once, every method's reference, and the shipped reward
functions and their loading.

The reward, "short and ends with EOS" (see test_ppo.py), is learnable in a few steps from a random model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import tunelab
import tunelab.objectives.grpo as grpo_recipe
from tests.helpers import rlhf_config
from tunelab.errors import ConfigError, TunelabError
from tunelab.rl.rewards import exact_answer, load_reward_function, one_line
from tunelab.tiny import EOS, SPECIAL_TOKENS
from tunelab.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ROOT / "data" / "rlhf" / "prompts_train.jsonl"
HELD_OUT = ROOT / "data" / "rlhf" / "prompts_eval.jsonl"
EOS_ID = SPECIAL_TOKENS.index(EOS)
MAX_NEW_TOKENS = 16
# As in test_ppo.py: LoRA on the LM head too, which the random tiny model needs.
LORA = {"name": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj", "lm_head"]}
KEYS = {"step", "loss", "reward", "reward_std", "kl", "entropy", "clip_frac", "completion_length"}


def short_and_ended(prompts, completions, completion_ids, **_):
    """2 if the completion ends with EOS, minus its length / 16."""
    return [2.0 * (len(ids) > 0 and ids[-1] == EOS_ID) - len(ids) / MAX_NEW_TOKENS for ids in completion_ids]


def grpo_config(model_dir, output_dir, *overrides, method=None, eval_file=None, **objective):
    objective = {
        "name": "grpo",
        "reward_functions": [f"{__file__}:short_and_ended"],
        "num_generations": 8,
        "max_new_tokens": MAX_NEW_TOKENS,
        "beta": 0.04,
        **objective,
    }
    train = {"max_steps": 20, "batch_size": 4, "lr": 5e-3, "schedule": "constant"}
    eval_section = {"num_examples": 16, "batch_size": 16}
    return rlhf_config(
        model_dir, output_dir, overrides, objective, PROMPTS, eval_file, method, train, eval_section
    )


@pytest.mark.parametrize(("method", "lr"), [({"name": "full"}, 5e-3), (LORA, 1e-2)], ids=["full", "lora"])
def test_grpo_raises_the_reward_while_kl_stays_bounded(llama_dir, tmp_path, method, lr):
    out = tmp_path / "grpo"
    summary = tunelab.train(grpo_config(llama_dir, out, f"train.lr={lr}", method=method, eval_file=HELD_OUT))
    rows = read_metrics(out)
    assert len(rows) == 20 and all(KEYS <= set(r) for r in rows)
    rewards = [r["reward"] for r in rows]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 1.0
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4)
    assert max(r["kl"] for r in rows) < 8.0  # mean k3 per token
    assert all(r["clip_frac"] == 0.0 for r in rows)  # one pass, one mini-batch: the ratio is 1
    assert summary["eval_reward"] > summary["eval_reward_before"]


def test_weighted_reward_functions_and_every_option(llama_dir, tmp_path):
    """Two reward functions with weights; several passes and mini-batches (clipping becomes active),
    micro-batches, sequence aggregation, unscaled advantages, clip-higher, top-p."""
    tunelab.train(
        grpo_config(
            llama_dir,
            tmp_path / "run",
            "train.max_steps=3",
            "train.grad_accum=2",
            reward_functions=[f"{__file__}:short_and_ended", "tunelab.rl.rewards:one_line"],
            reward_weights=[1.0, 0.5],
            num_generations=4,
            num_iterations=2,
            num_mini_batches=2,
            loss_aggregation="sequence",
            scale_rewards=False,
            epsilon_high=0.28,
            top_p=0.9,
            temperature=0.8,
        )
    )
    rows = read_metrics(tmp_path / "run")
    for row in rows:
        combined = row["reward/short_and_ended"] + 0.5 * row["reward/one_line"]
        assert row["reward"] == pytest.approx(combined, abs=1e-5)
        assert math.isfinite(row["loss"])
    assert any(r["clip_frac"] > 0 for r in rows)


LEVELS = {"Name a colour.": 0, "Count to three.": 1, "Spell the word cat.": 2, "Say hello twice.": 3}
BY_PROMPT = """import json

LEVELS = {levels!r}


def by_prompt(prompts, completions, completion_ids, level, **_):
    \"\"\"10 x the prompt's level (read from the prompt text) + a function of the completion; logs its inputs.\"\"\"
    with open({log!r}, "a") as log:
        log.write(json.dumps({{"prompts": prompts, "completion_ids": completion_ids, "level": level}}) + "\\n")
    return [10.0 * LEVELS[p] + sum(ids) % 7 for p, ids in zip(prompts, completion_ids, strict=True)]
"""


def test_completions_are_scored_and_grouped_with_their_own_prompt(llama_dir, tmp_path, monkeypatch):
    """A reward that depends on the prompt: each completion is generated from, and scored against,
    the same prompt (with that prompt's columns); the G completions of a group share one prompt;
    the advantages and the logged reward_std are those of the scores within each prompt's group."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "level": k}) + "\n" for p, k in LEVELS.items()))
    log = tmp_path / "rewards.jsonl"
    reward_file = tmp_path / "by_prompt.py"
    reward_file.write_text(BY_PROMPT.format(levels=LEVELS, log=str(log)))
    batches = []
    real_updates = grpo_recipe.policy_updates

    def keep_batch(run, optimizer, batch, *rest):
        batches.append(batch)
        return real_updates(run, optimizer, batch, *rest)

    monkeypatch.setattr(grpo_recipe, "policy_updates", keep_batch)
    group = 4
    config = grpo_config(
        llama_dir,
        tmp_path / "run",
        "train.max_steps=1",
        "train.batch_size=4",
        f"data.train={prompts}",
        reward_functions=[f"{reward_file}:by_prompt"],
        num_generations=group,
        max_new_tokens=6,
    )
    tunelab.train(config)

    (call,) = [json.loads(line) for line in log.read_text().splitlines()]
    (batch,) = batches
    rollout, tokenizer = batch.rollout, AutoTokenizer.from_pretrained(llama_dir)
    assert len(call["prompts"]) == batch.size == len(LEVELS) * group
    for row, (prompt, level) in enumerate(zip(call["prompts"], call["level"], strict=True)):
        assert level == LEVELS[prompt]  # the prompt's own columns
        prompt_part = rollout.input_ids[row, : rollout.prompt_length][
            rollout.attention_mask[row, : rollout.prompt_length].bool()
        ]
        assert prompt in tokenizer.decode(prompt_part)  # generated from the prompt it is scored with
        assert call["completion_ids"][row] == rollout.completion_ids[row]
    groups = [call["prompts"][g * group : (g + 1) * group] for g in range(len(LEVELS))]
    assert all(len(set(members)) == 1 for members in groups)  # a group is one prompt's completions
    assert sorted(members[0] for members in groups) == sorted(LEVELS)
    # Advantages by hand, within each prompt's completions (found by prompt, not by position).
    scores = torch.tensor(
        [
            10.0 * LEVELS[p] + sum(ids) % 7
            for p, ids in zip(call["prompts"], call["completion_ids"], strict=True)
        ]
    )
    expected, stds = torch.zeros(len(scores)), []
    for prompt in LEVELS:
        rows = torch.tensor([i for i, p in enumerate(call["prompts"]) if p == prompt])
        mean, std = scores[rows].mean(), scores[rows].std()
        expected[rows] = (scores[rows] - mean) / (std + 1e-4)
        stds.append(float(std))
    assert min(stds) > 0  # every group has something to compare
    torch.testing.assert_close(batch.advantages.cpu(), expected)
    (row,) = read_metrics(tmp_path / "run")
    assert row["reward"] == pytest.approx(float(scores.mean()), abs=1e-5)
    assert row["reward_std"] == pytest.approx(sum(stds) / len(stds), abs=1e-5)  # std within groups


@pytest.mark.parametrize(
    "method",
    [
        {"name": "partial", "last_layers": 1},
        {"name": "adapter", "bottleneck": 8},
        {"name": "prefix", "num_virtual_tokens": 4},
    ],
    ids=["partial", "adapter", "prefix"],
)
def test_every_method_trains_with_grpo(llama_dir, tmp_path, method):
    tunelab.train(
        grpo_config(llama_dir, tmp_path / "run", "train.max_steps=2", "train.batch_size=2", method=method)
    )
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)


def test_grpo_without_kl_needs_no_reference(llama_dir, tmp_path):
    tunelab.train(
        grpo_config(llama_dir, tmp_path / "run", "train.max_steps=1", "train.batch_size=2", beta=0.0)
    )
    assert "kl" not in read_metrics(tmp_path / "run")[0]


def test_shipped_reward_functions():
    completions = ["5", " 5 \n", "#### 1,234", "red\nfox", "### Response: 5", ""]
    answers = ["5", "5", "The total is #### 1234", "red", "5", "5"]
    assert exact_answer([None] * 6, completions, answers) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert one_line([None] * 6, completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]  # "###" is template markup


def test_reward_function_specs(tmp_path):
    assert load_reward_function("tunelab.rl.rewards:exact_answer") is exact_answer
    assert load_reward_function(f"{__file__}:short_and_ended")(None, None, [[1, EOS_ID]]) == [2.0 - 2 / 16]
    for spec, message in [
        ("tunelab.rl.rewards:nothing", "has no function 'nothing'"),
        ("tunelab.no_such_module:f", "cannot import"),
        (f"{tmp_path}/missing.py:f", "does not exist"),
    ]:
        with pytest.raises(TunelabError, match=message):
            load_reward_function(spec)
    with pytest.raises(ConfigError, match="package.module:function"):
        grpo_config("m", tmp_path, reward_functions=["exact_answer"])
    with pytest.raises(ConfigError, match="give reward_functions"):
        grpo_config("m", tmp_path, reward_functions=[])
    with pytest.raises(ConfigError, match="reward_weights has 2 values for 1"):
        grpo_config("m", tmp_path, reward_weights=[1.0, 2.0])
    with pytest.raises(ConfigError, match="num_generations must be at least 2"):
        grpo_config("m", tmp_path, num_generations=1)


def test_a_reward_function_returning_the_wrong_number_of_values_is_named(llama_dir, tmp_path):
    bad = tmp_path / "bad_reward.py"
    bad.write_text("def f(prompts, completions, **_):\n    return [1.0]\n")
    with pytest.raises(TunelabError, match="reward function f returned 1 values for 16 completions"):
        tunelab.train(
            grpo_config(
                llama_dir,
                tmp_path / "run",
                "train.max_steps=1",
                "train.batch_size=2",
                reward_functions=[f"{bad}:f"],
            )
        )

"""`tunelab eval` of a PPO or GRPO run: the rewards of greedy answers to its held-out prompts,
computed again from the saved run, equal the figures the run measured after training."""

from __future__ import annotations

import pytest

import tunelab
from tests.recipes.test_eval_pairs import eval_json
from tests.recipes.test_grpo import HELD_OUT, LORA, grpo_config
from tests.recipes.test_ppo import ppo_config


@pytest.mark.parametrize("objective", ["grpo", "ppo"])
def test_eval_of_an_online_run_gives_its_held_out_rewards(llama_dir, tmp_path, capsys, objective):
    run = tmp_path / objective
    make = grpo_config if objective == "grpo" else ppo_config
    summary = tunelab.train(make(llama_dir, run, "train.max_steps=3", method=LORA, eval_file=HELD_OUT))
    answer = "completion" if objective == "grpo" else "response"
    figures = eval_json(capsys, run, "--limit", "16", "--batch-size", "16")
    assert figures["prompts"] == 16
    names = [name for name in summary if name.startswith("eval_") and not name.endswith("_before")]
    assert "eval_reward" in names and f"eval_{answer}_length" in names
    for name in names:
        assert figures[name] == pytest.approx(summary[name], rel=1e-5, abs=1e-6), name

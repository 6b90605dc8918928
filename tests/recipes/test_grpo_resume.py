"""GRPO resume: a run stopped after a checkpoint and resumed logs what the run that never stopped
logs. The checkpoint must carry the policy, the optimizer, the data position (the next prompts)
and the RNG state: with two mini-batches per step, `rl/updates.py` shuffles the completions into
mini-batches with torch's generator, so the resumed steps update on the same mini-batches only
if it is restored. (The completions themselves are sampled with keys of (seed, step, position) and
need no RNG state.)
"""

from __future__ import annotations

import pytest

import tunelab
from tests.recipes.test_grpo import LORA, grpo_config
from tests.recipes.test_sft import interrupt_after
from tunelab.training.metrics import read_metrics

COMPARED = ("loss", "reward", "reward_std", "kl", "completion_length", "clip_frac", "grad_norm")


def mean_token(prompts, completions, completion_ids, **_):
    """The completion's mean token id / 100: it differs within every group from the first step on,
    so every step's advantages, and updates, are non-zero."""
    return [sum(ids) / max(len(ids), 1) / 100 for ids in completion_ids]


def test_grpo_resume_equals_no_stop(llama_dir, tmp_path):
    common = ["train.max_steps=4", "train.save_every=2", "train.batch_size=2", "train.lr=1e-2"]
    options = {"num_generations": 4, "num_mini_batches": 2, "reward_functions": [f"{__file__}:mean_token"]}

    def config(name, *overrides):
        return grpo_config(llama_dir, tmp_path / name, *common, *overrides, method=LORA, **options)

    tunelab.train(config("full"))
    with pytest.raises(KeyboardInterrupt):
        interrupt_after(3, config("cut"))
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["step-2"]
    tunelab.train(config("cut", "train.resume=true"))
    straight, resumed = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for key in COMPARED:
        assert [r[key] for r in resumed] == pytest.approx([r[key] for r in straight], rel=1e-5, abs=1e-6), key
    assert all(r["grad_norm"] > 0 for r in straight)  # every step learns: the shuffle matters

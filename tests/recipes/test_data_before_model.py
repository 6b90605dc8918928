"""Every objective reads and checks its data before any model weights load: a bad record fails in
seconds with one line naming its file, not after a large model's load.

Every model load in transformers goes through `PreTrainedModel.from_pretrained` (the Auto classes
call it on the concrete class); it is replaced by a recorder, so a test fails if any load happens
before the data error (and still fails, by a different error, if the data were not checked at all).
"""

from __future__ import annotations

import json

import pytest
from transformers import PreTrainedModel

import tunelab
from tests.helpers import rlhf_config
from tunelab.errors import TunelabError


def constant_reward(prompts, completions, **_):
    """1 for every completion (a reward function for the RL configs; never called here)."""
    return [1.0 for _ in completions]


GOOD = {
    "sft": {"instruction": "Say hi.", "input": "", "output": "hi"},
    "preference": {"prompt": "Say hi.", "chosen": "hi", "rejected": "no"},
    "kto": {"prompt": "Say hi.", "completion": "hi", "label": True},
    "prompt": {"prompt": "Say hi."},
}
BAD = {  # each a record of its format with its defining field missing
    "sft": {"instruction": "Say hi.", "input": ""},
    "preference": {"prompt": "Say hi.", "chosen": "hi"},
    "kto": {"prompt": "Say hi.", "completion": "hi"},
    "prompt": {"answer": "hi"},
}
REWARDS = {"reward_functions": [f"{__file__}:constant_reward"], "max_new_tokens": 4}
OBJECTIVES = {  # objective -> (its options, the data format it reads, data.format)
    "sft": ({"name": "sft"}, "sft", "instruction"),
    "reward": ({"name": "reward"}, "preference", "preference"),
    "dpo": ({"name": "dpo"}, "preference", "preference"),
    "kto": ({"name": "kto"}, "kto", "auto"),
    "ppo": ({"name": "ppo", **REWARDS}, "prompt", "prompt"),
    "grpo": ({"name": "grpo", "num_generations": 2, **REWARDS}, "prompt", "prompt"),
}


@pytest.fixture
def model_loads(monkeypatch) -> list[str]:
    """The names of every model `from_pretrained` is asked for (none is loaded)."""
    calls: list[str] = []

    def record(cls, name_or_path=None, *args, **kwargs):
        calls.append(f"{cls.__name__}({name_or_path})")
        raise AssertionError(f"model weights loaded before the data failed: {calls[-1]}")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(record))
    return calls


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_a_bad_record_fails_before_the_model_loads(objective, llama_dir, tmp_path, model_loads):
    options, kind, data_format = OBJECTIVES[objective]
    train = tmp_path / "train.jsonl"
    rows = [GOOD[kind]] * 3 + [BAD[kind]] + [GOOD[kind]] * 4
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = rlhf_config(
        llama_dir,
        tmp_path / "out",
        [f"data.format={data_format}"],
        options,
        train,
        train={"max_steps": 1, "batch_size": 2},
    )
    with pytest.raises(TunelabError) as raised:
        tunelab.train(config)
    message = str(raised.value)
    assert "\n" not in message.strip()
    assert "train.jsonl" in message, message
    assert model_loads == []

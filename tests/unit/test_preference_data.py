"""Preference pairs and prompt-only sets: formats, tokenisation, and one clear error per bad record."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

from tunelab.config import DataConfig
from tunelab.data.dataset import prepare_data
from tunelab.data.preference import pad_pairs, prepare_preferences, prepare_prompts
from tunelab.data.tokenize import IGNORE_INDEX
from tunelab.errors import DataError

ROOT = Path(__file__).resolve().parents[2]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def pairs(tokenizer, path, **kwargs):
    return prepare_preferences(DataConfig(train=str(path), **kwargs), tokenizer)


def targets(tokenizer, example):
    return tokenizer.decode(
        [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX]
    )


def prompt_part(tokenizer, example):
    return tokenizer.decode(
        [t for t, label in zip(example.input_ids, example.labels, strict=True) if label == IGNORE_INDEX]
    )


def test_plain_pair_renders_like_sft_and_masks_the_prompt(tiny_tokenizer, tmp_path):
    """Both sides share the prompt tokens; only each response and the EOS are targets; with
    `instruction` + `input` fields the prompt is exactly SFT's alpaca prompt for the same record."""
    record = {
        "prompt": "What is the first word?\n\nred fox",
        "instruction": "What is the first word?",
        "input": "red fox",
        "chosen": "red",
        "rejected": "fox",
    }
    data = pairs(tiny_tokenizer, write_jsonl(tmp_path / "p.jsonl", [record]), template="alpaca")
    pair = data.train[0]
    eos = tiny_tokenizer.eos_token
    assert targets(tiny_tokenizer, pair.chosen) == "red" + eos
    assert targets(tiny_tokenizer, pair.rejected) == "fox" + eos
    assert prompt_part(tiny_tokenizer, pair.chosen) == prompt_part(tiny_tokenizer, pair.rejected)
    sft = prepare_data(
        DataConfig(
            train=str(
                write_jsonl(
                    tmp_path / "s.jsonl",
                    [{"instruction": "What is the first word?", "input": "red fox", "output": "red"}],
                )
            ),
            template="alpaca",
        ),
        tiny_tokenizer,
    )
    assert pair.chosen.input_ids == sft.train.examples[0].input_ids
    assert pair.chosen.labels == sft.train.examples[0].labels


def test_chat_pairs_explicit_and_implicit_prompt(tiny_tokenizer, tmp_path):
    """TRL's conversational form (prompt messages + assistant responses) and the implicit-prompt form
    (two whole conversations; the shared leading messages are the prompt) give the same tokens."""
    user = [{"role": "user", "content": "say hello"}]
    good, bad = [{"role": "assistant", "content": "hello"}], [{"role": "assistant", "content": "no"}]
    explicit = {"prompt": user, "chosen": good, "rejected": bad}
    implicit = {"chosen": user + good, "rejected": user + bad}
    data = pairs(tiny_tokenizer, write_jsonl(tmp_path / "c.jsonl", [explicit, implicit]))
    assert data.template == "chat"
    a, b = data.train
    assert a.chosen.input_ids == b.chosen.input_ids and a.rejected.labels == b.rejected.labels
    assert targets(tiny_tokenizer, a.chosen).startswith("hello")
    assert "say hello" in prompt_part(tiny_tokenizer, a.rejected)


def test_implicit_prompt_keeps_earlier_assistant_turns_in_the_prompt(tiny_tokenizer, tmp_path):
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
    ]
    record = {
        "chosen": history + [{"role": "assistant", "content": "good bye"}],
        "rejected": history + [{"role": "assistant", "content": "no"}],
    }
    pair = pairs(tiny_tokenizer, write_jsonl(tmp_path / "m.jsonl", [record])).train[0]
    assert targets(tiny_tokenizer, pair.chosen).startswith("good bye")
    assert "hello" in prompt_part(tiny_tokenizer, pair.chosen)


def test_margin_and_padding(tiny_tokenizer, tmp_path):
    rows = [
        {"prompt": "a b", "chosen": "yes", "rejected": "no", "margin": 2},
        {"prompt": "c", "chosen": "good good good", "rejected": "bad"},
    ]
    data = pairs(tiny_tokenizer, write_jsonl(tmp_path / "m.jsonl", rows), template="alpaca")
    assert [p.margin for p in data.train] == [2.0, 0.0]
    batch = pad_pairs(data.train, tiny_tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 4 and batch["margin"].tolist() == [2.0, 0.0]
    width = max(p.length for p in data.train)
    assert batch["input_ids"].shape[1] == width
    assert batch["attention_mask"][1].sum() == len(data.train[1].chosen.input_ids)  # row 1: chosen of pair 1


@pytest.mark.parametrize(
    ("row", "field", "problem"),
    [
        ({"prompt": "p", "rejected": "r"}, "chosen", "missing field"),
        ({"prompt": "p", "chosen": 3, "rejected": "r"}, "chosen", "expected a string or a list"),
        ({"chosen": "c", "rejected": "r"}, "prompt", "needed when chosen/rejected are strings"),
        (
            {"prompt": "p", "chosen": "c", "rejected": [{"role": "assistant", "content": "r"}]},
            "rejected",
            "both",
        ),
        ({"prompt": "p", "chosen": [{"role": "robot", "content": "c"}], "rejected": "r"}, "rejected", "both"),
        (
            {"prompt": "p", "chosen": [{"role": "robot", "content": "c"}], "rejected": []},
            "chosen[0].role",
            "must be one of",
        ),
        (
            {
                "prompt": "p",
                "chosen": [{"role": "user", "content": "c"}],
                "rejected": [{"role": "assistant", "content": "r"}],
            },
            "chosen[0].role",
            "start with an assistant",
        ),
        (
            {
                "chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "c"}],
                "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "r"}],
            },
            "chosen",
            "shared prompt",
        ),
        ({"prompt": "p", "chosen": "c", "rejected": "r", "margin": "big"}, "margin", "expected a number"),
        ({"prompt": "p", "chosen": "", "rejected": "r"}, "chosen", "is empty"),
        ({"prompt": "p", "chosen": "c", "rejected": " "}, "rejected", "only whitespace"),
        ({"prompt": "", "chosen": "c", "rejected": "r"}, "prompt", "is empty"),
        ({"prompt": "p", "chosen": "c", "rejected": "x \ud800"}, "rejected", "lone surrogate"),
        (
            {"prompt": [{"role": "user", "content": ""}], "chosen": "c", "rejected": "r"},
            "prompt[0].content",
            "is empty",
        ),
    ],
)
def test_bad_preference_records_name_file_line_and_field(tiny_tokenizer, tmp_path, row, field, problem):
    good = {"prompt": "p", "chosen": "c", "rejected": "r"}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good, row])
    with pytest.raises(DataError) as err:
        pairs(tiny_tokenizer, path, template="alpaca")
    assert (err.value.source, err.value.record, err.value.field) == (str(path), 3, field)
    assert problem in str(err.value)
    skipped = pairs(tiny_tokenizer, path, template="alpaca", skip_bad_records=True)
    assert len(skipped.train) == 2 and "skipped 1 bad records" in skipped.notes


def test_bad_json_line_and_wrong_format(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}, "{not json"])
    with pytest.raises(DataError, match=r"bad.jsonl, record 2: not valid JSON"):
        pairs(tiny_tokenizer, path)
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}])
    with pytest.raises(DataError, match="reads preference records, but data.format is 'instruction'"):
        pairs(tiny_tokenizer, good, format="instruction")


def test_responses_cut_by_max_length_are_dropped_and_counted(tiny_tokenizer, tmp_path):
    rows = [
        {"prompt": "short", "chosen": "yes", "rejected": "no"},
        {"prompt": "the quick brown fox " * 10, "chosen": "yes", "rejected": "no"},
    ]
    data = pairs(tiny_tokenizer, write_jsonl(tmp_path / "t.jsonl", rows), template="alpaca", max_length=24)
    assert len(data.train) == 1
    assert any("dropped 1 training pairs" in note for note in data.notes)


def test_eval_fraction_holds_out_pairs(tiny_tokenizer, tmp_path):
    rows = [{"prompt": f"q {i}", "chosen": "yes", "rejected": "no"} for i in range(10)]
    data = pairs(
        tiny_tokenizer, write_jsonl(tmp_path / "e.jsonl", rows), template="alpaca", eval_fraction=0.2
    )
    assert (len(data.train), len(data.eval)) == (8, 2)


def test_every_kind_of_data_holds_out_the_same_records(tiny_tokenizer, tmp_path):
    """One split rule (tunelab/data/splits.py): with the same seed, SFT records, preference pairs
    and RL prompts hold out the same record numbers, and `max_records` then keeps the first of the
    records that train."""
    n, cfg = 12, {"template": "alpaca", "eval_fraction": 0.25, "max_records": 5}
    sft_path = write_jsonl(
        tmp_path / "s.jsonl", [{"instruction": f"say {i}", "output": "ok"} for i in range(n)]
    )
    pair_rows = [{"prompt": f"say {i}", "chosen": "yes", "rejected": "no"} for i in range(n)]
    pair_path = write_jsonl(tmp_path / "p.jsonl", pair_rows)
    prompt_path = write_jsonl(tmp_path / "q.jsonl", [{"prompt": f"say {i}"} for i in range(n)])
    sft = prepare_data(DataConfig(train=str(sft_path), **cfg), tiny_tokenizer, seed=3)
    preferences = prepare_preferences(DataConfig(train=str(pair_path), **cfg), tiny_tokenizer, seed=3)
    prompts = prepare_prompts(DataConfig(train=str(prompt_path), **cfg), tiny_tokenizer, seed=3)

    def number(text: str) -> int:
        return int(text.split("say ")[1].split()[0])

    held = sorted(number(conv.turns[-2][1]) for conv in sft.eval.conversations)
    assert len(held) == 3 and held != [0, 1, 2]  # a seeded choice, not the first records
    assert sorted(number(prompt_part(tiny_tokenizer, p.chosen)) for p in preferences.eval) == held
    assert sorted(number(p.prompt) for p in prompts.eval) == held
    training = [number(conv.turns[-2][1]) for conv in sft.train.conversations]
    assert training == [i for i in range(n) if i not in held][:5]
    assert [number(p.prompt) for p in prompts.train] == training


def test_prompts_keep_answer_and_match_sft_generation_prompts(tiny_tokenizer, tmp_path):
    rows = [
        {"prompt": "What is 2 plus 3?", "answer": "5"},
        {"question": "How many words?", "answer": "#### 2"},  # openai/gsm8k's field name
        {"prompt": [{"role": "user", "content": "hi"}], "answer": "hello"},
    ]
    data = prepare_prompts(
        DataConfig(train=str(write_jsonl(tmp_path / "p.jsonl", rows)), template="alpaca"), tiny_tokenizer
    )
    first, second, third = data.train
    assert [e.extra["answer"] for e in data.train] == ["5", "#### 2", "hello"]
    assert first.prompt == "What is 2 plus 3?" and third.prompt == [{"role": "user", "content": "hi"}]
    assert tiny_tokenizer.decode(first.prompt_ids) == "### Instruction:\nWhat is 2 plus 3?\n\n### Response:\n"
    assert tiny_tokenizer.decode(second.prompt_ids).startswith("### Instruction:\nHow many words?")
    chat = prepare_prompts(DataConfig(train=str(tmp_path / "p.jsonl"), template="chat"), tiny_tokenizer)
    assert tiny_tokenizer.decode(chat.train[2].prompt_ids).endswith("<|assistant|>\n")


def test_bad_prompt_records_and_long_prompts(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "fine"}, {"answer": "x"}])
    with pytest.raises(DataError) as err:
        prepare_prompts(DataConfig(train=str(path)), tiny_tokenizer)
    assert (err.value.record, err.value.field) == (2, "prompt")
    path = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "fine"}, {"prompt": "the quick brown fox " * 20}])
    data = prepare_prompts(DataConfig(train=str(path), template="alpaca", max_length=32), tiny_tokenizer)
    assert len(data.train) == 1 and any("longer than data.max_length" in n for n in data.notes)


def test_bundled_rlhf_data_loads_and_is_regenerated_exactly(tiny_tokenizer, tmp_path):
    """data/rlhf/ is what scripts/make_rlhf_data.py writes; every pair has a wrong `rejected`."""
    script = runpy.run_path(str(ROOT / "scripts" / "make_rlhf_data.py"))
    script["write"](tmp_path)
    for name in (
        "preference_train.jsonl",
        "preference_eval.jsonl",
        "prompts_train.jsonl",
        "prompts_eval.jsonl",
    ):
        assert (tmp_path / name).read_text() == (ROOT / "data" / "rlhf" / name).read_text(), name
    rows = [json.loads(line) for line in (ROOT / "data/rlhf/preference_train.jsonl").read_text().splitlines()]
    assert all(r["chosen"] != r["rejected"] for r in rows)
    config = DataConfig(
        train=str(ROOT / "data/rlhf/preference_eval.jsonl"), template="alpaca", max_records=20
    )
    assert len(prepare_preferences(config, tiny_tokenizer).train) == 20
    prompts = DataConfig(train=str(ROOT / "data/rlhf/prompts_eval.jsonl"), template="alpaca")
    assert len(prepare_prompts(prompts, tiny_tokenizer).train) == 200


def test_held_out_sets_left_empty_by_max_length_are_refused(tiny_tokenizer, tmp_path):
    long = "the quick brown fox " * 20
    train = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}])
    held_out = write_jsonl(tmp_path / "e.jsonl", [{"prompt": long, "chosen": "c", "rejected": "r"}])
    with pytest.raises(DataError, match="eval set is empty") as err:
        pairs(tiny_tokenizer, train, eval=str(held_out), template="alpaca", max_length=24)
    assert err.value.source == str(held_out)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "fine"}])
    long_prompts = write_jsonl(tmp_path / "q.jsonl", [{"prompt": long}])
    with pytest.raises(DataError, match="eval set is empty") as err:
        cfg = DataConfig(train=str(prompts), eval=str(long_prompts), template="alpaca", max_length=24)
        prepare_prompts(cfg, tiny_tokenizer)
    assert err.value.source == str(long_prompts)
    with pytest.raises(DataError, match="eval_fraction"):
        prepare_prompts(DataConfig(train=str(prompts), eval_fraction=0.5), tiny_tokenizer)

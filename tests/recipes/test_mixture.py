"""A mixture of three local sources, each with its own format, column mapping and share: the
documented proportions, and an SFT run over it that resumes exactly."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import pytest

import tunelab
from tests.helpers import sft_config
from tests.recipes.test_sft import interrupt_after, losses
from tunelab.config import DataConfig, SourceConfig
from tunelab.data.dataset import prepare_data
from tunelab.training.metrics import read_metrics


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def mixture(tmp_path) -> list[SourceConfig]:
    """A: 10 instruction records (columns q, a), weight 2 -> 20; B: 8 chat records (column dialog),
    records 5 -> 5; C: 6 prompt/completion records (columns question, reply), weight 0.5 -> 3."""
    a = write_jsonl(tmp_path / "a.jsonl", [{"q": f"alpha {i}", "a": f"{i}"} for i in range(10)])
    b = write_jsonl(
        tmp_path / "b.jsonl",
        [
            {"dialog": [{"role": "user", "content": f"beta {i}"}, {"role": "assistant", "content": f"{i}"}]}
            for i in range(8)
        ],
    )
    c = write_jsonl(tmp_path / "c.jsonl", [{"question": f"gamma {i}", "reply": f"{i}"} for i in range(6)])
    return [
        SourceConfig(path=a, columns={"q": "instruction", "a": "output"}, weight=2),
        SourceConfig(path=b, format="chat", columns={"dialog": "messages"}, records=5),
        SourceConfig(
            path=c,
            format="prompt_completion",
            columns={"question": "prompt", "reply": "completion"},
            weight=0.5,
        ),
    ]


def prompts(data) -> list[str]:
    return [next(content for role, content in c.turns if role == "user") for c in data.train.conversations]


def test_a_mixture_takes_the_documented_proportions(tmp_path, tiny_tokenizer):
    cfg = DataConfig(train=mixture(tmp_path), template="alpaca", cache_dir=None)
    data = prepare_data(cfg, tiny_tokenizer, seed=1)
    taken = Counter(p.split()[0] for p in prompts(data))
    assert taken == {"alpha": 20, "beta": 5, "gamma": 3} and len(data.train.examples) == 28
    each = Counter(prompts(data))
    assert all(each[f"alpha {i}"] == 2 for i in range(10))  # weight 2: every record twice
    assert max(each[p] for p in each if not p.startswith("alpha")) == 1  # samples without repeats
    assert data.format == "chat+instruction+prompt_completion"
    assert data.notes[0].endswith("a.jsonl: 10 records, 20 taken (71.4%)")
    assert data.notes[1].endswith("b.jsonl: 8 records, 5 taken (17.9%)")
    assert data.notes[2].endswith("c.jsonl: 6 records, 3 taken (10.7%)")
    assert prompts(prepare_data(cfg, tiny_tokenizer, seed=1)) == prompts(data)  # a function of the seed
    cached = replace(cfg, cache_dir=str(tmp_path / "cache"))
    assert prepare_data(cached, tiny_tokenizer, seed=1).notes == data.notes
    assert prepare_data(cached, tiny_tokenizer, seed=1).notes == data.notes  # read back from the cache
    other = prompts(prepare_data(cfg, tiny_tokenizer, seed=2))
    assert other != prompts(data) and Counter(p.split()[0] for p in other) == taken
    # held out per source before sampling (round(f n): 2.5 -> 2, 2, 1.5 -> 2): none also trains
    cfg.eval_fraction = 0.25
    held = prepare_data(cfg, tiny_tokenizer, seed=1)
    held_prompts = {c.turns[0][1] for c in held.eval.conversations}
    assert len(held_prompts) == 2 + 2 + 2 and not held_prompts & set(prompts(held))


def test_a_run_over_a_mixture_resumes_exactly(tiny_model_dirs, tmp_path):
    model_dir = tiny_model_dirs["llama"]
    common = ["train.max_steps=8", "train.save_every=4", "train.lr=1e-3"]

    def config(name, *extra):
        run = sft_config(model_dir, "unused", tmp_path / name, *common, *extra)
        run.data.train = mixture(tmp_path)
        return run

    # 28 examples in batches of 8: the run crosses an epoch. It reads the mixture back from the
    # token cache; the stopped and the resumed runs mix and tokenise it afresh in memory, so the
    # mixture and the batch order must be functions of the seed alone.
    tunelab.train(config("full", f"data.cache_dir={tmp_path / 'cache'}"))
    straight = losses(tmp_path / "full")
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 1
    with pytest.raises(KeyboardInterrupt):
        interrupt_after(5, config("cut", "data.cache_dir=null"))
    tunelab.train(config("cut", "data.cache_dir=null", "train.resume=true"))
    assert [r["step"] for r in read_metrics(tmp_path / "cut")] == list(range(1, 9))
    assert losses(tmp_path / "cut") == pytest.approx(straight, rel=1e-6)

"""The token cache: a second run tokenises nothing and reads the same examples (memory-mapped);
any input that changes the tokens (a data file, the tokenizer, the template, max_length) makes a
new entry; options that only batch the data do not; tokenising in processes gives the same arrays."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import numpy as np
import pytest

from tunelab.config import DataConfig
from tunelab.data import tokenize
from tunelab.data.dataset import prepare_data
from tunelab.data.tokenize import encode_conversations, encode_in_parallel
from tunelab.errors import DataError, TunelabError


def rows(n, tag=""):
    return [{"instruction": f"{tag}add {i} and {i + 1}", "output": f"{2 * i + 1}"} for i in range(n)]


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def dump(data):
    """Everything a run reads from prepared data, as plain values."""
    splits = [data.train] + ([data.eval] if data.eval else [])
    return (
        [[(e.input_ids, e.labels) for e in split.examples] for split in splits],
        [[c.turns for c in split.conversations] for split in splits],
        data.notes,
        data.format,
        data.template,
    )


@pytest.fixture
def tokenizer(tiny_tokenizer):
    return copy.deepcopy(tiny_tokenizer)  # the tests set a chat template on it


def test_the_second_run_reads_the_cache_and_every_input_invalidates_it(tmp_path, tokenizer):
    train = write(tmp_path / "train.jsonl", rows(40))
    cfg = DataConfig(
        train=str(train),
        eval_fraction=0.2,
        max_length=20,
        template="alpaca",
        cache_dir=str(tmp_path / "cache"),
    )
    in_memory = prepare_data(replace(cfg, cache_dir=None), tokenizer, seed=3)
    first = prepare_data(cfg, tokenizer, seed=3)
    second = prepare_data(cfg, tokenizer, seed=3)
    assert first.tokenized == 40 and second.tokenized == 0 and first.cache == second.cache
    assert dump(first) == dump(second) == dump(in_memory)
    assert "truncated" in " ".join(first.notes)  # notes come back from the entry too
    assert isinstance(second.train.examples.ids, np.memmap)
    assert second.train.examples.lengths.tolist() == [len(e.input_ids) for e in in_memory.train.examples]
    # the same contents under another name share the entry (it is keyed by contents, not paths)
    moved = write(tmp_path / "moved.jsonl", rows(40))
    assert prepare_data(replace(cfg, train=str(moved)), tokenizer, seed=3).tokenized == 0
    # options that only batch or place the tokens share the entry
    assert prepare_data(replace(cfg, packing=True, group_by_length=True), tokenizer, seed=3).tokenized == 0
    # every input that changes the tokens makes a new entry
    other_tokenizer = copy.deepcopy(tokenizer)
    other_tokenizer.add_tokens([" and"])  # one more token in the vocabulary
    changed = {
        "max_length": (replace(cfg, max_length=24), tokenizer, 3),
        "template": (replace(cfg, template="plain"), tokenizer, 3),
        "seed (hold-out)": (cfg, tokenizer, 4),
        "tokenizer": (cfg, other_tokenizer, 3),
    }
    chat = replace(cfg, template="chat")
    assert prepare_data(chat, tokenizer, seed=3).tokenized == 40
    changed["chat template"] = (
        replace(chat, chat_template="{% for m in messages %}{{ m.content }};{% endfor %}"),
        tokenizer,
        3,
    )
    for what, (config, tok, seed) in changed.items():
        assert prepare_data(config, tok, seed=seed).tokenized == 40, what
        assert prepare_data(config, tok, seed=seed).tokenized == 0, what
    write(train, rows(39) + [{"instruction": "add 39 and 40", "output": "80"}])  # one answer changed
    assert prepare_data(cfg, tokenizer, seed=3).tokenized == 40
    assert prepare_data(cfg, tokenizer, seed=3).tokenized == 0


def test_a_failed_build_leaves_no_entry(tmp_path, tiny_tokenizer):
    train = write(tmp_path / "train.jsonl", rows(3) + [{"instruction": "x", "output": ""}])
    cfg = DataConfig(train=str(train), cache_dir=str(tmp_path / "cache"))
    for _ in range(2):  # the error comes again: nothing was kept
        with pytest.raises(DataError, match="record 4, field 'output': is empty"):
            prepare_data(cfg, tiny_tokenizer)
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".lock"]


def test_processes_tokenise_the_same_arrays_in_order(monkeypatch, tiny_tokenizer):
    from tunelab.data.formats import Conversation

    conversations = [
        Conversation([("user", f"add {i} and {i}"), ("assistant", f"{2 * i}")]) for i in range(23)
    ]
    monkeypatch.setattr(tokenize, "CHUNK", 5)
    serial = encode_conversations(conversations, tiny_tokenizer, "alpaca", 20, False, True)
    chunks = list(encode_in_parallel(conversations, tiny_tokenizer, "alpaca", 20, False, workers=2))
    assert len(chunks) == 5
    assert np.array_equal(np.concatenate([c.ids for c in chunks]), serial.ids)
    assert np.array_equal(np.concatenate([c.targets for c in chunks]), serial.targets)
    assert [i for c in chunks for i in c.kept] == serial.kept  # indices into the whole list
    assert sum(c.truncated for c in chunks) == serial.truncated > 0
    assert sum(c.empty for c in chunks) == serial.empty == 23 - len(serial.kept) > 0


def test_a_cache_folder_that_cannot_be_written_is_one_line(tmp_path, tiny_tokenizer):
    train = write(tmp_path / "train.jsonl", rows(3))
    (tmp_path / "file").write_text("not a folder")
    cfg = DataConfig(train=str(train), cache_dir=str(tmp_path / "file" / "cache"))
    with pytest.raises(TunelabError, match=r"data.cache_dir: cannot write the token cache in .*file/cache"):
        prepare_data(cfg, tiny_tokenizer)


def _prepare_in_child(cfg, tokenizer, results):
    data = prepare_data(cfg, tokenizer, seed=0)
    results.put((data.tokenized, [e.input_ids for e in data.train.examples]))


def test_processes_starting_together_build_once_and_read_the_same_entry(tmp_path, tiny_tokenizer):
    """As the ranks of a launch do: one process takes the lock and builds, the others wait, then read."""
    import multiprocessing as mp

    train = write(tmp_path / "train.jsonl", rows(30))
    cfg = DataConfig(train=str(train), template="alpaca", cache_dir=str(tmp_path / "cache"))
    context = mp.get_context("fork")
    results = context.Queue()
    processes = [
        context.Process(target=_prepare_in_child, args=(cfg, tiny_tokenizer, results)) for _ in range(3)
    ]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    assert sorted(tokenized for tokenized, _ in outcomes) == [0, 0, 30]
    assert outcomes[0][1] == outcomes[1][1] == outcomes[2][1]

"""Sources of data: hub-style data sets read by subset name through `datasets.load_dataset`, globs,
column mappings, streams with a seeded shuffle buffer, and the config surface of `data.train` lists."""

from __future__ import annotations

import json

import pytest

from tunelab.config import DataConfig, SourceConfig, field_docs, load_config
from tunelab.data.dataset import prepare_data
from tunelab.data.sources import read_source
from tunelab.errors import ConfigError, DataError


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


README = """---
configs:
- config_name: main
  data_files:
  - split: train
    path: main/train.jsonl
  - split: test
    path: main/test.jsonl
- config_name: socratic
  data_files:
  - split: train
    path: socratic/train.jsonl
---
# A local data set laid out as on the hub (gsm8k-like: two subsets)
"""


@pytest.fixture
def hub_folder(tmp_path):
    """A folder `datasets.load_dataset` reads offline as the hub would: two configs (subsets)."""
    root = tmp_path / "gsm8k-like"
    write_jsonl(
        root / "main" / "train.jsonl", [{"question": f"main q{i}", "answer": f"a{i}"} for i in range(6)]
    )
    write_jsonl(root / "main" / "test.jsonl", [{"question": "main test q", "answer": "t"}])
    write_jsonl(
        root / "socratic" / "train.jsonl", [{"question": f"soc q{i}", "answer": f"s{i}"} for i in range(4)]
    )
    (root / "README.md").write_text(README)
    return root


def test_a_local_hub_style_data_set_is_read_by_subset_name(hub_folder):
    for subset, split, expected in [
        ("main", "train", [f"main q{i}" for i in range(6)]),
        ("main", "test", ["main test q"]),
        ("socratic", "train", [f"soc q{i}" for i in range(4)]),
    ]:
        parts, skipped = read_source(SourceConfig(path=str(hub_folder), subset=subset, split=split), False, 0)
        ((name, records),) = parts
        assert [r["question"] for _, r in records] == expected and skipped == 0
        assert [n for n, _ in records] == list(range(1, len(expected) + 1))
        assert f"subset {subset}" in name and f"split {split}" in name
    with pytest.raises(DataError, match=r"gsm8k-like \(subset nope, split train\): cannot load the data set"):
        read_source(SourceConfig(path=str(hub_folder), subset="nope", split="train"), False, 0)


def test_subset_with_column_mapping_trains_and_a_missing_column_is_named(
    hub_folder, tiny_tokenizer, tmp_path
):
    columns = {"question": "instruction", "answer": "output"}
    cfg = DataConfig(
        train=[SourceConfig(path=str(hub_folder), subset="socratic", columns=columns)],
        eval=[SourceConfig(path=str(hub_folder), subset="main", split="test", columns=columns)],
        template="alpaca",
        cache_dir=None,
    )
    data = prepare_data(cfg, tiny_tokenizer)
    assert data.format == "instruction"
    assert [c.extra["instruction"] for c in data.train.conversations] == [f"soc q{i}" for i in range(4)]
    assert [c.turns[-1][1] for c in data.eval.conversations] == ["t"]
    # a record lacking a mapped column: the file, the record and the column are named
    write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "a"}, {"question": "q2", "reply": "a2"}])
    cfg = DataConfig(train=[SourceConfig(path=str(tmp_path / "bad.jsonl"), columns=columns)], cache_dir=None)
    with pytest.raises(DataError, match=r"bad.jsonl, record 2, field 'answer': missing column"):
        prepare_data(cfg, tiny_tokenizer)
    cfg.skip_bad_records = True
    data = prepare_data(cfg, tiny_tokenizer)
    assert len(data.train.examples) == 1 and data.train.skipped == 1


def test_a_glob_reads_every_file_in_order_and_names_the_bad_one(tmp_path, tiny_tokenizer):
    write_jsonl(tmp_path / "d" / "a.jsonl", [{"instruction": "a1", "output": "x"}])
    write_jsonl(
        tmp_path / "d" / "b.jsonl",
        [{"instruction": "b1", "output": "y"}, {"instruction": "b2", "output": "z"}],
    )
    cfg = DataConfig(
        train=[SourceConfig(path=str(tmp_path / "d" / "*.jsonl"))], template="alpaca", cache_dir=None
    )
    data = prepare_data(cfg, tiny_tokenizer)
    assert [c.extra["instruction"] for c in data.train.conversations] == ["a1", "b1", "b2"]
    write_jsonl(tmp_path / "d" / "c.jsonl", [{"instruction": "c1", "output": ""}])
    with pytest.raises(DataError, match=r"c.jsonl, record 1, field 'output': is empty"):
        prepare_data(cfg, tiny_tokenizer)
    cfg.train = [SourceConfig(path=str(tmp_path / "none" / "*.jsonl"))]
    with pytest.raises(DataError, match="no file matches this pattern"):
        prepare_data(cfg, tiny_tokenizer)


def test_a_stream_is_shuffled_by_the_seed_and_stops_after_records(hub_folder):
    def questions(seed, records=4):
        src = SourceConfig(
            path=str(hub_folder), subset="main", split="train", streaming=True, records=records
        )
        src.shuffle_buffer = 6
        ((_, rows),) = read_source(src, False, seed)[0]
        return [r["question"] for _, r in rows]

    first = questions(1)
    assert len(first) == 4 and len(set(first)) == 4 and set(first) <= {f"main q{i}" for i in range(6)}
    assert questions(1) == first  # the same seed: the same records in the same order
    assert any(questions(seed) != first for seed in range(2, 6))
    assert sorted(questions(1, records=None)) == sorted(f"main q{i}" for i in range(6))


def test_train_lists_parse_and_bad_ones_name_the_key(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "model: {name_or_path: m}\n"
        "data:\n  train:\n    - {path: openai/gsm8k, subset: main, columns: {question: instruction}, weight: 2}\n"
        "    - {path: data/*.jsonl, format: chat, records: 50}\n"
    )
    data = load_config(config).data
    assert data.train[0] == SourceConfig(
        path="openai/gsm8k", subset="main", columns={"question": "instruction"}, weight=2.0
    )
    assert data.train[1].records == 50 and data.train[1].format == "chat"
    for text, expected in [
        ("[{path: a.jsonl, wieght: 2}]", r"unknown key 'data.train\[0\].wieght'.*in .*run.yaml"),
        ("[{path: a.jsonl, weight: 2, records: 3}]", r"data.train\[0\]: give weight or records, not both"),
        ("[{path: a.jsonl, weight: -1}]", r"data.train\[0\]: weight: must be positive"),
        ("[{path: a.jsonl, records: 0}]", r"data.train\[0\]: records: must be at least 1"),
        ("[{subset: main}]", r"data.train\[0\]: path: must name"),
        ("[a.jsonl]", r"data.train\[0\]: expected a mapping"),
        ("[{path: a.jsonl, format: xml}]", r"data.train\[0\].format: expected"),
    ]:
        config.write_text(f"model: {{name_or_path: m}}\ndata:\n  train: {text}\n")
        with pytest.raises(ConfigError, match=expected):
            load_config(config)
    documented = field_docs(SourceConfig)
    assert [name for name in SourceConfig.__dataclass_fields__ if name not in documented] == []

"""Data: formats, templates, loss masks, truncation, and one clear error per bad input."""

from __future__ import annotations

import json

import pytest

from tunelab.config import DataConfig
from tunelab.data.collate import batch_stream, count_targets, epoch_batches, pad_batch
from tunelab.data.dataset import prepare_data, prompt_and_reference
from tunelab.data.tokenize import IGNORE_INDEX
from tunelab.errors import DataError


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def prepare(tokenizer, path, **kwargs):
    return prepare_data(DataConfig(train=str(path), **kwargs), tokenizer)


def test_instruction_loss_only_on_response_plus_eos(tiny_tokenizer, tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"instruction": "say hello", "input": "", "output": "hello world"}]
    )
    data = prepare(tiny_tokenizer, path, template="alpaca")
    example = data.train.examples[0]
    targets = [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX]
    assert tiny_tokenizer.decode(targets) == "hello world" + tiny_tokenizer.eos_token
    prompt = [t for t, label in zip(example.input_ids, example.labels, strict=True) if label == IGNORE_INDEX]
    assert tiny_tokenizer.decode(prompt) == "### Instruction:\nsay hello\n\n### Response:\n"


def test_dolly_fields_and_input_section(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "add", "context": "1 2", "response": "3"}])
    data = prepare(tiny_tokenizer, path, template="alpaca")
    text = tiny_tokenizer.decode(data.train.examples[0].input_ids)
    assert "### Input:\n1 2" in text and text.endswith("3" + tiny_tokenizer.eos_token)


def test_train_on_prompt_puts_loss_everywhere(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a b", "output": "c"}])
    data = prepare(tiny_tokenizer, path, template="alpaca", train_on_prompt=True)
    assert IGNORE_INDEX not in data.train.examples[0].labels


def test_chat_template_masks_user_turns(tiny_tokenizer, tmp_path):
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "good bye"},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    data = prepare(tiny_tokenizer, path)
    assert data.format == "chat" and data.template == "chat"
    example = data.train.examples[0]
    target_text = tiny_tokenizer.decode(
        [t for t, lab in zip(example.input_ids, example.labels, strict=True) if lab != IGNORE_INDEX]
    )
    assert target_text == "hello<|eos|>\ngood bye<|eos|>\n"
    ids, reference = prompt_and_reference(data.train.conversations[0], tiny_tokenizer, "chat")
    assert reference == "good bye"
    assert tiny_tokenizer.decode(ids).endswith("<|user|>\nbye<|eos|>\n<|assistant|>\n")


def test_prompt_completion_and_text(tiny_tokenizer, tmp_path):
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "2 + 2 =", "completion": " 4"}])
    assert prepare(tiny_tokenizer, pc).format == "prompt_completion"
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "the quick brown fox"}])
    data = prepare(tiny_tokenizer, text)
    assert data.format == "text"
    assert all(label != IGNORE_INDEX for label in data.train.examples[0].labels)


def test_truncation_is_counted(tiny_tokenizer, tmp_path):
    rows = [{"instruction": "x", "output": "the quick brown fox " * 30}, {"instruction": "y", "output": "no"}]
    data = prepare(tiny_tokenizer, write_jsonl(tmp_path / "d.jsonl", rows), template="alpaca", max_length=16)
    assert data.train.truncated == 1
    assert all(len(e.input_ids) <= 16 for e in data.train.examples)
    assert any("truncated 1" in note for note in data.notes)


def test_csv_and_json_list_sources(tiny_tokenizer, tmp_path):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("instruction,output\nsay yes,yes\nsay no,no\n")
    assert len(prepare(tiny_tokenizer, csv_path).train.examples) == 2
    json_path = tmp_path / "d.json"
    json_path.write_text(json.dumps([{"instruction": "a", "output": "b"}]))
    assert len(prepare(tiny_tokenizer, json_path).train.examples) == 1


def test_eval_fraction_holds_out_records(tiny_tokenizer, tmp_path):
    rows = [{"instruction": f"say {i}", "output": str(i)} for i in range(20)]
    data = prepare(tiny_tokenizer, write_jsonl(tmp_path / "d.jsonl", rows), eval_fraction=0.25)
    assert len(data.train.examples) == 15 and len(data.eval.examples) == 5


@pytest.mark.parametrize(
    ("rows", "fmt", "expected"),
    [
        (
            ['{"instruction": "a", "output": "b"}', '{"instruction": "a", "output": '],
            "auto",
            "record 2: not valid JSON",
        ),
        (
            [{"instruction": "a", "output": "b"}, {"instruction": "a"}],
            "auto",
            "record 2, field 'output': missing field",
        ),
        (
            [{"instruction": "a", "output": "b"}, {"instruction": 3, "output": "b"}],
            "auto",
            "record 2, field 'instruction': expected a string",
        ),
        ([{"messages": [{"role": "robot", "content": "x"}]}], "chat", "field 'messages[0].role'"),
        ([{"foo": "bar"}], "auto", "cannot tell the data format"),
    ],
)
def test_bad_records_name_file_record_and_field(tiny_tokenizer, tmp_path, rows, fmt, expected):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as err:
        prepare(tiny_tokenizer, path, format=fmt)
    assert str(path) in str(err.value) and expected in str(err.value)


def test_skip_bad_records_counts_them(tiny_tokenizer, tmp_path):
    rows = [
        '{"instruction": "a", "output": "b"}',
        "{broken",
        '{"instruction": "c"}',
        '{"instruction": "d", "output": "e"}',
    ]
    data = prepare(tiny_tokenizer, write_jsonl(tmp_path / "d.jsonl", rows), skip_bad_records=True)
    assert len(data.train.examples) == 2 and data.train.skipped == 2
    rows = [
        '{"instruction": "a", "output": "b"}',
        '{"instruction": "c"}',
        '{"instruction": "d", "output": "e"}',
    ]
    data = prepare(tiny_tokenizer, write_jsonl(tmp_path / "e.jsonl", rows), skip_bad_records=True)
    assert len(data.train.examples) == 2 and data.train.skipped == 1
    assert "skipped 1 bad records" in data.notes


def test_empty_file_and_unknown_type(tiny_tokenizer, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        prepare(tiny_tokenizer, empty)
    weird = tmp_path / "data.txt"
    weird.write_text("hello")
    with pytest.raises(DataError, match="unknown data file type"):
        prepare(tiny_tokenizer, weird)
    with pytest.raises(DataError, match="does not exist"):
        prepare(tiny_tokenizer, tmp_path / "missing.jsonl")


def test_batches_are_seeded_and_resumable():
    lengths = list(range(1, 24))
    stream = batch_stream(lengths, 4, seed=3)
    first = [next(stream) for _ in range(15)]
    resumed = batch_stream(lengths, 4, seed=3, start=9)
    assert [next(resumed) for _ in range(6)] == first[9:]
    assert epoch_batches(lengths, 4, 3, 0) != epoch_batches(lengths, 4, 3, 1)
    grouped = epoch_batches(lengths, 4, 3, 0, group_by_length=True)
    assert sorted(i for b in grouped for i in b) == list(range(23))


def test_pad_batch_masks_padding(tiny_tokenizer, tmp_path):
    rows = [
        {"instruction": "a", "output": "b"},
        {"instruction": "the quick brown fox", "output": "jumps over"},
    ]
    data = prepare(tiny_tokenizer, write_jsonl(tmp_path / "d.jsonl", rows), template="alpaca")
    batch = pad_batch(data.train.examples, tiny_tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert count_targets(batch["labels"]) == sum(e.num_targets for e in data.train.examples)
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_plain_template_concatenates_prompt_and_completion(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "2 + 2 =", "completion": " 4"}])
    data = prepare(tiny_tokenizer, path, template="plain")
    example = data.train.examples[0]
    assert tiny_tokenizer.decode(example.input_ids) == "2 + 2 = 4" + tiny_tokenizer.eos_token
    targets = [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX]
    assert tiny_tokenizer.decode(targets) == " 4" + tiny_tokenizer.eos_token
    ids, reference = prompt_and_reference(data.train.conversations[0], tiny_tokenizer, "plain")
    assert tiny_tokenizer.decode(ids) == "2 + 2 =" and reference == " 4"


GOOD = b'{"instruction": "a", "output": "b"}\n'


@pytest.mark.parametrize(
    ("name", "content", "record", "field", "problem"),
    [
        (
            "d.jsonl",
            GOOD + b'{"instruction": "a", "output": "\xff\xfe"}\n',
            2,
            None,
            "not UTF-8 text: byte 0xff",
        ),
        ("d.jsonl", GOOD.decode().encode("utf-16"), None, None, "UTF-16"),
        (
            "d.json",
            b'[{"instruction": "a", "output": "\xff"}]',
            None,
            None,
            "not UTF-8 text: byte 0xff at line 1",
        ),
        ("d.csv", b"instruction,output\na,b\nc,\xff\n", None, None, "not UTF-8 text: byte 0xff at line 3"),
        ("d.jsonl", GOOD + b"[" * 100_000 + b"\n", 2, None, "nested too deeply"),
        (
            "d.jsonl",
            GOOD + b'{"instruction": "a", "output": ' + b"9" * 5000 + b"}\n",
            2,
            None,
            "not valid JSON",
        ),
        ("d.json", b"[" + b"9" * 5000 + b"]", None, None, "not valid JSON"),
        (
            "d.json",
            b'[\n{"instruction": "a", "output": "b"},\n{"instruction" "a"}\n]',
            None,
            None,
            "at line 3",
        ),
        ("d.jsonl", GOOD + b'{"instruction": "a", "output": "x \\ud800"}\n', 2, "output", "lone surrogate"),
        ("d.jsonl", GOOD + b'{"instruction": "a", "output": ""}\n', 2, "output", "is empty"),
        ("d.jsonl", GOOD + b'{"instruction": " ", "output": "b"}\n', 2, "instruction", "only whitespace"),
        ("d.csv", b"instruction,output\na,b\nc,\n", 2, "output", "is empty"),
        ("d.csv", b"instruction,output\na,b\nc,d,e,f\n", 2, None, "4 cells, the header has 2"),
        ("d.csv", b'text\nfirst\n"second\nthird\n', 2, None, "not valid CSV"),
        ("d.parquet", b"", None, None, "not a readable Parquet file"),
        ("d.parquet", GOOD, None, None, "not a readable Parquet file"),
    ],
)
def test_bad_bytes_name_file_record_and_field(
    tiny_tokenizer, tmp_path, name, content, record, field, problem
):
    path = tmp_path / name
    path.write_bytes(content)
    fmt = "text" if content.startswith(b"text") else "instruction"
    with pytest.raises(DataError) as err:
        prepare(tiny_tokenizer, path, format=fmt)
    assert (err.value.source, err.value.record, err.value.field) == (str(path), record, field)
    assert problem in str(err.value) and "\n" not in str(err.value)


def test_chat_message_content_must_not_be_empty(tiny_tokenizer, tmp_path):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}])
    with pytest.raises(DataError) as err:
        prepare(tiny_tokenizer, path, format="chat")
    assert (err.value.record, err.value.field) == (1, "messages[1].content")
    system = [{"role": "system", "content": ""}, *messages[:1], {"role": "assistant", "content": "yo"}]
    data = prepare(tiny_tokenizer, write_jsonl(tmp_path / "s.jsonl", [{"messages": system}]), format="chat")
    assert len(data.train.examples) == 1  # an empty system message stays valid


def test_bom_crlf_and_huge_csv_cells_are_read(tiny_tokenizer, tmp_path):
    bom = b"\xef\xbb\xbf"
    rows = [{"instruction": "say hi", "input": "", "output": "hi"}, {"instruction": "say yo", "output": "yo"}]
    (tmp_path / "a.jsonl").write_bytes(bom + "".join(json.dumps(r) + "\r\n" for r in rows).encode())
    (tmp_path / "b.json").write_bytes(bom + json.dumps(rows).encode())
    (tmp_path / "c.csv").write_bytes(
        bom + b"instruction,output\r\nsay hi,hi\r\nsay yo," + b"yo " * 100_000 + b"\r\n"
    )
    for name in ("a.jsonl", "b.json", "c.csv"):
        data = prepare(tiny_tokenizer, tmp_path / name, max_length=32)
        assert len(data.train.examples) == 2, name
    assert data.notes == ["truncated 1 of 2 training examples to 32 tokens"]


def test_skip_bad_records_skips_undecodable_lines(tiny_tokenizer, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(GOOD + b"\xff\xfe garbage\n" + b"[" * 100_000 + b"\n" + GOOD)
    data = prepare(tiny_tokenizer, path, skip_bad_records=True)
    assert len(data.train.examples) == 2 and data.train.skipped == 2


def test_eval_set_truncations_are_counted_and_an_empty_one_refused(tiny_tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"instruction": "say hi", "output": "hi"}])
    long = {"instruction": "repeat", "output": "the quick brown fox " * 20}
    held_out = write_jsonl(tmp_path / "e.jsonl", [{"instruction": "say yo", "output": "yo"}, long])
    data = prepare(tiny_tokenizer, train, eval=str(held_out), max_length=24, template="alpaca")
    assert "truncated 1 of 2 eval examples to 24 tokens" in data.notes
    too_long = write_jsonl(
        tmp_path / "l.jsonl", [{"instruction": "the quick brown fox " * 20, "output": "x"}]
    )
    with pytest.raises(DataError) as err:
        prepare(tiny_tokenizer, train, eval=str(too_long), max_length=24, template="alpaca")
    assert err.value.source == str(too_long) and "eval set is empty" in str(err.value)


def test_eval_fraction_taking_every_record_says_so(tiny_tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"instruction": "say hi", "output": "hi"}])
    with pytest.raises(DataError, match=r"data.eval_fraction=0.5 holds out all 1 usable records") as err:
        prepare(tiny_tokenizer, train, eval_fraction=0.5)
    assert err.value.source == str(train)


# A template that rewrites earlier turns as Qwen3's does: an assistant turn before the last user
# turn loses its `<think>...</think>` part; the turns after it keep theirs.
QWEN3_STYLE = r"""{%- set ns = namespace(last_query=0) -%}
{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_query = loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- for m in messages -%}
{%- if m.role == 'assistant' -%}
{%- set content = m.content -%}
{%- if loop.index0 < ns.last_query and '</think>' in content -%}
{%- set content = content.split('</think>')[-1].lstrip('\n') -%}
{%- endif -%}
{{- '<|im_start|>assistant\n' + content + '<|im_end|>\n' -}}
{%- else -%}
{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"""


def test_a_template_rewriting_earlier_turns_trains_each_assistant_turn_as_rendered(tiny_tokenizer, tmp_path):
    """Under a Qwen3-style template (given as `data.chat_template`, here from a file) a two-turn
    chat gives two examples; in example k only the tokens of assistant turn k, rendered with its
    thinking as the last turn, carry loss (labels checked token by token against texts written out
    by hand)."""
    import copy

    tokenizer = copy.deepcopy(tiny_tokenizer)
    (tmp_path / "qwen3.jinja").write_text(QWEN3_STYLE)
    first, second = "<think>\nadd\n</think>\n\nfour", "<think>\nagain\n</think>\n\nsix"
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": second},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    data = prepare_data(
        DataConfig(
            train=str(path), template="chat", chat_template=str(tmp_path / "qwen3.jinja"), cache_dir=None
        ),
        tokenizer,
    )
    assert tokenizer.chat_template == QWEN3_STYLE  # generation renders prompts the same way
    expected = [
        ("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", first + "<|im_end|>\n"),
        (
            "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\nfour<|im_end|>\n"
            "<|im_start|>user\n3+3?<|im_end|>\n<|im_start|>assistant\n",
            second + "<|im_end|>\n",
        ),
    ]
    assert len(data.train.examples) == 2
    for example, (prompt, target) in zip(data.train.examples, expected, strict=True):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
        assert example.input_ids == prompt_ids + target_ids
        assert example.labels == [IGNORE_INDEX] * len(prompt_ids) + target_ids
    # a template that keeps earlier turns as they are still gives one example per conversation
    plain = prepare_data(DataConfig(train=str(path), template="chat", cache_dir=None), tiny_tokenizer)
    assert len(plain.train.examples) == 1

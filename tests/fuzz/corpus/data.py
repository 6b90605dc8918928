"""The `data` surface: data files in every format with bad records and bad bytes."""

from __future__ import annotations

import copy
import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.fuzz.corpus.common import (
    SUFFIXES,
    TEXT_SUFFIXES,
    Case,
    Invocation,
    Workspace,
    earlier_run,
    garbage,
    place,
    run_config,
    write,
    write_config,
)

# ---------------------------------------------------------------- data: formats and files


@dataclass(frozen=True)
class DataFormat:
    """A record format: the objective that reads it, three valid records, the field the type
    mutations hit (`field`) and where a string mutation goes (`slot`, a path into the record)."""

    name: str
    objective: dict
    records: tuple[dict, ...]
    field: str
    slot: tuple = ()

    @property
    def slot_name(self) -> str:
        """The slot as a `DataError` names it (`messages[1].content`)."""
        parts = self.slot or (self.field,)
        return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(parts))

    def valid(self) -> list[dict]:
        return copy.deepcopy(list(self.records))

    def set_slot(self, record: dict, value) -> None:
        node = record
        parts = self.slot or (self.field,)
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value


def _chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


GRPO = {
    "name": "grpo",
    "reward_functions": ["tunelab.rl.rewards:one_line"],
    "num_generations": 2,
    "max_new_tokens": 2,
}
FORMATS = {
    f.name: f
    for f in (
        DataFormat(
            "instruction",
            {"name": "sft"},
            (
                {"instruction": "Reverse the words.", "input": "red owl sun", "output": "sun owl red"},
                {"instruction": "Count the words.", "input": "red owl", "output": "2"},
                {"instruction": "Repeat the text.", "input": "blue fox", "output": "blue fox"},
            ),
            "output",
        ),
        DataFormat(
            "chat",
            {"name": "sft"},
            (
                _chat("Reverse: red owl sun", "sun owl red"),
                _chat("Count: red owl", "2"),
                _chat("Repeat: blue fox", "blue fox"),
            ),
            "messages",
            ("messages", 1, "content"),
        ),
        DataFormat(
            "prompt_completion",
            {"name": "sft"},
            (
                {"prompt": "Reverse: red owl sun =", "completion": " sun owl red"},
                {"prompt": "Count: red owl =", "completion": " 2"},
                {"prompt": "Repeat: blue fox =", "completion": " blue fox"},
            ),
            "completion",
        ),
        DataFormat(
            "text",
            {"name": "sft"},
            ({"text": "The red owl sat in the sun."}, {"text": "Two words."}, {"text": "A blue fox ran."}),
            "text",
        ),
        DataFormat(
            "preference",
            {"name": "reward"},
            (
                {"prompt": "Reverse: red owl sun", "chosen": "sun owl red", "rejected": "red owl sun"},
                {"prompt": "Count: red owl", "chosen": "2", "rejected": "3"},
                {"prompt": "Repeat: blue fox", "chosen": "blue fox", "rejected": "fox"},
            ),
            "chosen",
        ),
        DataFormat(
            "prompt",
            GRPO,
            (
                {"prompt": "Reverse: red owl sun"},
                {"prompt": "Count: red owl"},
                {"prompt": "Repeat: blue fox"},
            ),
            "prompt",
        ),
    )
}


class Raw(str):
    """A record written into a JSON or JSONL file as this text, as it is."""


def to_jsonl(records: list) -> bytes:
    return "".join((r if isinstance(r, Raw) else json.dumps(r)) + "\n" for r in records).encode()


def to_json(records: list) -> bytes:
    body = ",\n".join(r if isinstance(r, Raw) else json.dumps(r) for r in records)
    return f"[\n{body}\n]\n".encode()


def to_csv(rows: list[list], line_end: str = "\n") -> bytes:
    """Rows of cells (the first is the header), quoted as needed."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator=line_end)
    for row in rows:
        writer.writerow(row)
    return out.getvalue().encode()


def csv_rows(records: list[dict]) -> list[list]:
    """Header (the first record's keys) and one row of cells per record."""
    header = list(records[0])
    return [header] + [[r.get(k, "") for k in header] for r in records]


def to_parquet(records: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(records), out)
    return out.getvalue()


def serialize(records: list, suffix: str, line_end: str = "\n") -> bytes:
    if suffix == ".jsonl":
        return to_jsonl(records).replace(b"\n", line_end.encode())
    if suffix == ".json":
        return to_json(records).replace(b"\n", line_end.encode())
    if suffix == ".csv":
        return to_csv(csv_rows(records), line_end)
    return to_parquet(records)


@dataclass(frozen=True)
class DataOutcome:
    """A mutated data file and where its error must point (or that it is valid)."""

    content: bytes
    record: int | None = None
    field: str | None = None
    accepted: bool = False


Mutation = Callable[[DataFormat, str], "DataOutcome | None"]  # None: does not apply to this file type
PLACEHOLDER = "@@fuzz@@"


def _with_bytes(fmt: DataFormat, suffix: str, raw: bytes) -> bytes:
    """The valid file with record 2's slot holding the bytes `raw` (encoded or not)."""
    records = fmt.valid()
    fmt.set_slot(records[1], PLACEHOLDER)
    return serialize(records, suffix).replace(PLACEHOLDER.encode(), raw)


def _record_two(fmt: DataFormat, suffix: str, change: Callable[[dict], None], all_rows_in_parquet: bool):
    """Apply `change` to record 2 (for a Parquet file whose columns must keep one type: to every
    record, so record 1 is the first bad one)."""
    records = fmt.valid()
    if suffix == ".parquet" and all_rows_in_parquet:
        for record in records:
            change(record)
        return serialize(records, suffix), 1
    change(records[1])
    return serialize(records, suffix), 2


def type_mutation(value, all_rows_in_parquet: bool = True) -> Mutation:
    """Record 2's `field` set to `value` (`DELETE`: removed)."""

    def mutate(fmt: DataFormat, suffix: str) -> DataOutcome | None:
        if suffix == ".csv":
            return None  # every CSV cell is a string: the CSV rows below cover this file type

        def change(record: dict) -> None:
            if value is DELETE:
                record.pop(fmt.field)
            else:
                record[fmt.field] = copy.deepcopy(value)

        content, number = _record_two(fmt, suffix, change, all_rows_in_parquet)
        return DataOutcome(content, number, fmt.field)

    return mutate


DELETE = object()


def empty_string(fmt: DataFormat, suffix: str) -> DataOutcome | None:
    if suffix == ".csv" or (suffix != ".jsonl" and fmt.name != "instruction"):
        return None  # one file type per format is enough (each costs a training step today)
    content, number = _record_two(fmt, suffix, lambda r: fmt.set_slot(r, ""), all_rows_in_parquet=False)
    return DataOutcome(content, number, fmt.slot_name)


def not_an_object(fmt: DataFormat, suffix: str) -> DataOutcome | None:
    if suffix not in (".jsonl", ".json"):
        return None
    records = fmt.valid()
    records[1] = Raw("[1, 2, 3]")
    return DataOutcome(serialize(records, suffix), 2)


def lone_surrogate(fmt: DataFormat, suffix: str) -> DataOutcome | None:
    """A JSON escape for half a UTF-16 pair: valid JSON, but no Unicode string."""
    if suffix not in (".jsonl", ".json"):
        return None
    records = fmt.valid()
    fmt.set_slot(records[1], "owl \ud800 red")
    return DataOutcome(serialize(records, suffix), 2, fmt.slot_name)


def huge_integer(fmt: DataFormat, suffix: str) -> DataOutcome | None:
    """A 5,000-digit number (more than Python converts from text by default)."""
    if suffix not in (".jsonl", ".json"):
        return None
    records = fmt.valid()
    fmt.set_slot(records[1], PLACEHOLDER)
    text = serialize(records, suffix).replace(f'"{PLACEHOLDER}"'.encode(), b"9" * 5000)
    return DataOutcome(text, 2 if suffix == ".jsonl" else None)


def invalid_utf8(fmt: DataFormat, suffix: str) -> DataOutcome | None:
    if suffix == ".csv" and fmt.name == "chat":
        return None
    if suffix == ".parquet":  # Parquet's binary values: bytes, not strings
        return _parquet_bytes(fmt)
    content = _with_bytes(fmt, suffix, b"owl \xff\xfe red")
    return DataOutcome(content, 2 if suffix == ".jsonl" else None)


def _parquet_bytes(fmt: DataFormat) -> DataOutcome:
    records = fmt.valid()
    for record in records:
        if fmt.name == "chat":
            for message in record["messages"]:
                message["content"] = b"owl \xff\xfe red"
        else:
            record[fmt.field] = b"owl \xff\xfe red"
    bad = "messages[0].content" if fmt.name == "chat" else fmt.field
    return DataOutcome(to_parquet(records), 1, bad)


def nul_byte(fmt: DataFormat, suffix: str) -> DataOutcome | None:
    """A NUL inside record 2's text: invalid JSON, but a valid character of a CSV or Parquet string."""
    if suffix == ".csv" and fmt.name == "chat":
        return None
    if suffix in (".csv", ".parquet"):
        if suffix == ".parquet":
            records = fmt.valid()
            fmt.set_slot(records[1], "owl \x00 red")
            return DataOutcome(to_parquet(records), accepted=True)
        return DataOutcome(_with_bytes(fmt, suffix, b"owl \x00 red"), accepted=True)
    return DataOutcome(_with_bytes(fmt, suffix, b"owl \x00 red"), 2 if suffix == ".jsonl" else None)


def truncated(fmt: DataFormat, suffix: str) -> DataOutcome | None:
    """The file cut short inside record 3."""
    content = serialize(fmt.valid(), suffix) if suffix != ".parquet" else b""
    if suffix == ".jsonl":
        lines = content.split(b"\n")
        cut = len(lines[0]) + len(lines[1]) + 2 + len(lines[2]) // 2
        return DataOutcome(content[:cut], 3)
    if suffix == ".json":
        return DataOutcome(content[: len(content) * 2 // 3])
    if suffix == ".csv":
        if fmt.name == "chat" or len(fmt.records[0]) < 2:
            return None  # a one-column row cut short is still a valid row
        last_row = content.rstrip(b"\n").rfind(b"\n") + 1
        return DataOutcome(content[: content.index(b",", last_row)], 3)
    return None  # .parquet: a file-level case below


def bom(fmt: DataFormat, suffix: str) -> DataOutcome | None:
    if suffix not in TEXT_SUFFIXES or (suffix == ".csv" and fmt.name == "chat"):
        return None
    return DataOutcome(b"\xef\xbb\xbf" + serialize(fmt.valid(), suffix), accepted=True)


def crlf(fmt: DataFormat, suffix: str) -> DataOutcome | None:
    if suffix not in TEXT_SUFFIXES or (suffix == ".csv" and fmt.name == "chat"):
        return None
    return DataOutcome(serialize(fmt.valid(), suffix, line_end="\r\n"), accepted=True)


def chat_messages(change: Callable[[list], list | None], bad_field: str, parquet: bool = True) -> Mutation:
    """Chat only: record 2's messages changed by `change` (which returns a replacement or edits)."""

    def mutate(fmt: DataFormat, suffix: str) -> DataOutcome | None:
        if fmt.name != "chat" or suffix == ".csv" or (suffix == ".parquet" and not parquet):
            return None
        records = fmt.valid()
        replaced = change(records[1]["messages"])
        if replaced is not None:
            records[1]["messages"] = replaced
        return DataOutcome(serialize(records, suffix), 2, bad_field)

    return mutate


def only_for(format_name: str, record_change: Callable[[dict], None], bad_field: str) -> Mutation:
    """A mutation of record 2 for one format, in JSONL and JSON files."""

    def mutate(fmt: DataFormat, suffix: str) -> DataOutcome | None:
        if fmt.name != format_name or suffix not in (".jsonl", ".json"):
            return None
        records = fmt.valid()
        record_change(records[1])
        return DataOutcome(serialize(records, suffix), 2, bad_field)

    return mutate


def _drop(record: dict, key: str) -> None:
    del record[key]


def _set(key: str, value) -> Callable[[dict], None]:
    return lambda record: record.__setitem__(key, value)


def _csv_case(make: Callable[[list[list], DataFormat], DataOutcome | None], formats: tuple = ()) -> Mutation:
    """A CSV-only mutation (of `formats`, default every format but chat: a cell holds no list)."""

    def mutate(fmt: DataFormat, suffix: str) -> DataOutcome | None:
        if suffix != ".csv" or fmt.name == "chat" or (formats and fmt.name not in formats):
            return None
        return make(csv_rows(fmt.valid()), fmt)

    return mutate


def _missing_column(rows: list[list], fmt: DataFormat) -> DataOutcome:
    rows[0] = ["notes" if h == fmt.field else h for h in rows[0]]
    return DataOutcome(to_csv(rows), 1, fmt.field)


def _short_row(rows: list[list], fmt: DataFormat) -> DataOutcome | None:
    if len(rows[0]) < 2:
        return None
    rows[2] = rows[2][:-1]
    return DataOutcome(to_csv(rows), 2)


def _extra_cells(rows: list[list], fmt: DataFormat) -> DataOutcome:
    rows[2] = rows[2] + ["stray", "cells"]
    return DataOutcome(to_csv(rows), 2)


def _unbalanced_quote(rows: list[list], fmt: DataFormat) -> DataOutcome:
    text = to_csv(rows).decode().split("\n")
    text[2] = '"' + text[2]  # opens a quoted cell that never closes
    return DataOutcome("\n".join(text).encode(), 2)


def _empty_cell(rows: list[list], fmt: DataFormat) -> DataOutcome:
    rows[2][rows[0].index(fmt.field)] = ""
    return DataOutcome(to_csv(rows), 2, fmt.field)


def _chat_as_csv(fmt: DataFormat, suffix: str) -> DataOutcome | None:
    """A CSV cell cannot hold a list: chat messages written as JSON text stay text."""
    if fmt.name != "chat" or suffix != ".csv":
        return None
    rows = [["messages"]] + [[json.dumps(r["messages"])] for r in fmt.records]
    return DataOutcome(to_csv(rows), 1, "messages")


DATA_MUTATIONS: dict[str, Mutation] = {
    "missing_field": type_mutation(DELETE, all_rows_in_parquet=False),
    "null": type_mutation(None, all_rows_in_parquet=False),
    "wrong_type": type_mutation(5),
    "nested_junk": type_mutation({"junk": {"deeper": [1, 2], "flag": True}, "more": [None]}),
    "empty_string": empty_string,
    "not_an_object": not_an_object,
    "lone_surrogate": lone_surrogate,
    "huge_integer": huge_integer,
    "invalid_utf8": invalid_utf8,
    "nul_byte": nul_byte,
    "truncated": truncated,
    "bom": bom,
    "crlf": crlf,
    "csv_missing_column": _csv_case(_missing_column),
    "csv_short_row": _csv_case(_short_row),
    # the CSV reader is the same for every format: these three with one or two formats (one to
    # several columns), as each costs a training step while tunelab accepts it
    "csv_extra_cells": _csv_case(_extra_cells, ("instruction",)),
    "csv_unbalanced_quote": _csv_case(_unbalanced_quote, ("instruction", "text")),
    "csv_empty_cell": _csv_case(_empty_cell, ("instruction",)),
    "csv_messages_as_text": _chat_as_csv,
    "messages_empty": chat_messages(lambda m: [], "messages"),
    "message_not_an_object": chat_messages(lambda m: ["hello"], "messages[0]", parquet=False),
    "message_bad_role": chat_messages(lambda m: m[1].__setitem__("role", "wizard"), "messages[1].role"),
    "message_no_content": chat_messages(lambda m: _drop(m[1], "content"), "messages[1].content"),
    "messages_no_assistant": chat_messages(lambda m: m[:1], "messages"),
    "responses_mixed_kinds": only_for(
        "preference", _set("rejected", [{"role": "assistant", "content": "x"}]), "rejected"
    ),
    "margin_not_a_number": only_for("preference", _set("margin", "big"), "margin"),
    "prompt_messages_bad_role": only_for(
        "prompt", _set("prompt", [{"role": "wizard", "content": "hi"}]), "prompt[0].role"
    ),
}


def whole_file_outcomes(suffix: str) -> dict[str, DataOutcome]:
    """Files whose content never reaches a record check (tried with the instruction format)."""
    valid = serialize(FORMATS["instruction"].valid(), suffix)
    out = {"empty_file": DataOutcome(b""), "binary_garbage": DataOutcome(garbage(4096))}
    if suffix in TEXT_SUFFIXES:
        out["whitespace_only"] = DataOutcome(b"\n  \n\t\n")
        out["utf16"] = DataOutcome(valid.decode().encode("utf-16"))
    if suffix == ".jsonl":
        out["huge_line"] = DataOutcome(valid.split(b"\n")[0] + b"\n" + b"x" * (1 << 20) + b"\n", 2)
        out["deep_nesting"] = DataOutcome(valid.split(b"\n")[0] + b"\n" + b"[" * 100_000 + b"\n", 2)
    if suffix == ".json":
        out["huge_line"] = DataOutcome(b"[" + b"x" * (1 << 20))
        out["deep_nesting"] = DataOutcome(b"[" * 100_000)
        out["top_level_object"] = DataOutcome(b'{"instruction": "a", "output": "b"}')
        out["wrapped_non_objects"] = DataOutcome(b'{"data": [5, 6]}', 1)
    if suffix == ".csv":
        out["huge_line"] = DataOutcome(valid.split(b"\n")[0] + b"\n" + b"x" * (1 << 20) + b"\n", 1)
        out["header_only"] = DataOutcome(b"instruction,input,output\n")
    if suffix == ".parquet":
        out["truncated"] = DataOutcome(valid[: len(valid) // 2])
        out["jsonl_inside"] = DataOutcome(to_jsonl(FORMATS["instruction"].valid()))
        out["no_rows"] = DataOutcome(_empty_parquet())
    return out


def _empty_parquet() -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = io.BytesIO()
    table = pa.table({"instruction": pa.array([], pa.string()), "output": pa.array([], pa.string())})
    pq.write_table(table, out)
    return out.getvalue()


def data_case(name: str, suffix: str, fmt: DataFormat, outcome: DataOutcome, command: str = "train") -> Case:
    """A data file fed to `train` (the format's objective) or to `eval --data` (`command`). A valid
    file of an SFT format goes to `eval --data`, which reads it as `train` does and prints how many
    records it read, without the cost of a training step."""
    if outcome.accepted and fmt.objective["name"] == "sft":
        command = "eval"

    def build(ws: Workspace) -> Invocation:
        data = write(ws.path("data", f"records{suffix}"), outcome.content)
        names = (str(data),) + place(outcome.record, outcome.field)
        if command == "eval":
            argv = ["eval", str(ws.model), "--data", str(data), "--format", fmt.name, "--no-generate"]
            says = (r'"records": 3',)
            return Invocation(argv, names, (data,), accepted=outcome.accepted, says=says)
        out = ws.root / "out" if outcome.accepted else earlier_run(ws.root / "earlier-run")
        config = run_config(ws, data, out, objective=fmt.objective, data={"format": fmt.name})
        cfg = write_config(ws, config)
        says = (r"data: 3 train /",)
        guarded = (data, cfg) if outcome.accepted else (data, cfg, out)
        return Invocation(["train", str(cfg)], names, guarded, accepted=outcome.accepted, says=says)

    tag = suffix.lstrip(".")
    return Case("data", f"{tag}/{fmt.name}/{name}@{command}", build)


def other_data_cases() -> list[Case]:
    """Paths that are not data files, the `auto` format, eval --data, and an earlier run's config."""

    def simple(name: str, make_path: Callable[[Workspace], Path], fmt: str = "instruction") -> Case:
        def build(ws: Workspace) -> Invocation:
            data = make_path(ws)
            out = earlier_run(ws.root / "earlier-run")
            cfg = write_config(ws, run_config(ws, data, out, data={"format": fmt}))
            return Invocation(["train", str(cfg)], (str(data),), (out, cfg))

        return Case("data", f"{name}@train", build)

    def auto(name: str, suffix: str, content: bytes) -> Case:
        return simple(
            f"{suffix.lstrip('.')}/auto/{name}", lambda ws: write(ws.path(f"d{suffix}"), content), "auto"
        )

    cases = [
        simple("other/missing_file", lambda ws: ws.root / "nowhere.jsonl"),
        simple(
            "other/unknown_suffix", lambda ws: write(ws.path("records.tsv"), "instruction\toutput\na\tb\n")
        ),
        simple("other/folder_not_file", lambda ws: _mkdir(ws.path("records.jsonl"))),
        auto("unknown_fields", ".jsonl", b'{"question_text": "a", "answer_text": "b"}\n'),
        auto("extra_cells", ".csv", b"foo,bar\na,b,c\n"),
    ]
    fmt = FORMATS["instruction"]
    for name in ("missing_field", "wrong_type", "invalid_utf8", "truncated"):
        cases.append(data_case(name, ".jsonl", fmt, DATA_MUTATIONS[name](fmt, ".jsonl"), command="eval"))
    cases.append(data_case("empty_file", ".jsonl", fmt, DataOutcome(b""), command="eval"))

    def keeps_config(ws: Workspace) -> Invocation:
        invocation = data_case(
            "wrong_type", ".jsonl", fmt, DATA_MUTATIONS["wrong_type"](fmt, ".jsonl")
        ).build(ws)
        invocation.rewritable = ()
        return invocation

    cases.append(Case("data", "jsonl/instruction/earlier_config_kept@train", keeps_config))
    return cases


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_cases() -> list[Case]:
    cases = []
    for suffix in SUFFIXES:
        for fmt in FORMATS.values():
            for name, mutation in DATA_MUTATIONS.items():
                outcome = mutation(fmt, suffix)
                if outcome is None or (
                    outcome.accepted and fmt.objective["name"] != "sft" and suffix != ".jsonl"
                ):
                    continue  # a valid file of an RL format costs a training step: JSONL only (same reader)
                cases.append(data_case(name, suffix, fmt, outcome))
        for name, outcome in whole_file_outcomes(suffix).items():
            cases.append(data_case(name, suffix, FORMATS["instruction"], outcome))
    return cases + other_data_cases()

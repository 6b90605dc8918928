"""The fuzz corpus of issue 21: every input surface of the command line, as tables of cases.

A case is a deterministic recipe: `case.build(workspace)` writes its inputs into the workspace's
folder (a test's `tmp_path`) and returns the `Invocation` to run, `tunelab COMMAND ...`, with what
must come of it. For a bad input (most cases) that is: exit status 2, on stderr one line
`tunelab COMMAND: error: ...` holding every string of `names` (the file, and for data the record
and field where the format has them), no traceback, and every file under `guarded` (an earlier
run's folder, the input files) byte for byte as before. An `accepted` case is an input that is
valid however odd it looks (CRLF line ends, a NUL inside a CSV cell, records longer than
`data.max_length`): exit status 0, and its stdout matches every pattern of `says` (for example that
the run reports what it truncated).

Surfaces (`SURFACES`):

- `data`: data files (.jsonl, .json, .csv, .parquet) in each record format with bad records
  (missing fields, wrong types, null, nested junk, empty strings, ...) and bad bytes (invalid
  UTF-8, binary garbage, a NUL byte, truncation, an empty file, a BOM, a huge line, CRLF);
- `config`: run configs (YAML syntax, unknown keys, wrong types, bad values, a missing file, an
  empty file, a list instead of a mapping, binary garbage) and `key=value` overrides;
- `adapter`: adapter folders given to `eval`, `generate` and `merge` with missing or corrupt files;
- `checkpoint`: the latest checkpoint of a run, corrupted, given to `train --resume`;
- `long`: records longer than `data.max_length` (truncated and counted, not errors);
- `eval-set`: evaluation sets that end up empty.

A case's id is `SURFACE/.../NAME@COMMAND`, for example `data/csv/text/bom@eval`. Valid data files
of the SFT formats go to `eval --data` (which reads them as `train` does and says how many records
it read) rather than through a training step; everything else runs as a user would run it.

`KNOWN_BUGS` (at the end) lists the cases tunelab fails today, each with what goes wrong and
where the fix belongs; the tests mark them `xfail(strict=True)`, so a fix shows up as XPASS and its
entry must then be deleted. `python -m tests.fuzz.corpus` prints the number of cases per surface.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

import yaml

SURFACES = ("data", "config", "adapter", "checkpoint", "long", "eval-set")
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
TEXT_SUFFIXES = (".jsonl", ".json", ".csv")


@dataclass
class Workspace:
    """Where a case writes its inputs (`root`), and the shared, read-only material it may copy:
    the tiny model folder and trained runs (`runs["lora"]` has checkpoints step-1 and step-2,
    `runs["prefix"]` and `runs["adapter"]` a `final/` each)."""

    root: Path
    model: Path
    runs: dict[str, Path]

    def path(self, *parts: str) -> Path:
        path = self.root.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path


@dataclass
class Invocation:
    """One run of the command line and what must come of it (see the module docstring)."""

    argv: list[str]
    names: tuple[str, ...] = ()
    guarded: tuple[Path, ...] = ()
    rewritable: tuple[str, ...] = ()
    """Files directly inside a guarded folder that a failed `train` may write anew (none: a run
    writes its `config.yaml` only once training starts)."""
    accepted: bool = False
    says: tuple[str, ...] = ()
    """Regular expressions (multi-line) stdout must match when the input is accepted."""

    @property
    def command(self) -> str:
        return self.argv[0]


@dataclass(frozen=True)
class Case:
    surface: str
    name: str
    build: Callable[[Workspace], Invocation] = field(compare=False, repr=False)

    @property
    def id(self) -> str:
        return f"{self.surface}/{self.name}"

    @property
    def bug(self) -> str | None:
        """Why tunelab fails this case today, or None."""
        return next((why for pattern, why in KNOWN_BUGS.items() if fnmatchcase(self.id, pattern)), None)


# ---------------------------------------------------------------- shared pieces


def write(path: Path, content: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def garbage(size: int, seed: int = 21) -> bytes:
    """`size` random bytes, the same every time."""
    return random.Random(seed).randbytes(size)


def earlier_run(folder: Path) -> Path:
    """A run folder as an earlier, finished run left it: whatever a failed run does, these files
    must stay as they are (small stand-ins: only their bytes are compared)."""
    write(folder / "config.yaml", "output_dir: earlier\n")
    write(folder / "metrics.jsonl", '{"step": 1, "loss": 1.0}\n')
    write(folder / "summary.json", '{"steps": 1}\n')
    write(folder / "final" / "config.json", '{"earlier": true}\n')
    write(folder / "final" / "model.safetensors", garbage(64, seed=1))
    write(folder / "checkpoints" / "step-1" / "state.json", '{"step": 1}\n')
    write(folder / "checkpoints" / "step-1" / "trainable.safetensors", garbage(64, seed=2))
    return folder


def run_config(ws: Workspace, train_file: Path | str, output_dir: Path, **sections) -> dict:
    """A small, quiet run config on the tiny model; `sections` update its sections."""
    config = {
        "model": {"name_or_path": str(ws.model)},
        "objective": {"name": "sft"},
        "data": {"train": str(train_file), "template": "alpaca", "max_length": 64},
        "train": {"max_steps": 1, "batch_size": 2, "progress": False, "seed": 0},
        "eval": {"max_new_tokens": 2, "num_examples": 2},
        "output_dir": str(output_dir),
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def write_config(ws: Workspace, config: dict, name: str = "run.yaml") -> Path:
    return write(ws.path(name), yaml.safe_dump(config, sort_keys=False))


def place(record: int | None = None, field_name: str | None = None) -> tuple[str, ...]:
    """The strings that name a record and a field in a `DataError` line."""
    where = (f"record {record}",) if record is not None else ()
    return where + ((repr(field_name),) if field_name is not None else ())


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


# ---------------------------------------------------------------- configs


def _valid_yaml(ws: Workspace, **sections) -> str:
    data = write(ws.path("data", "train.jsonl"), to_jsonl(FORMATS["instruction"].valid()))
    out = earlier_run(ws.root / "earlier-run")
    return yaml.safe_dump(run_config(ws, data, out, **sections), sort_keys=False)


def _yaml_with(**sections) -> Callable[[Workspace], str]:
    return lambda ws: _valid_yaml(ws, **sections)


def _literal(text: bytes | str) -> Callable[[Workspace], bytes | str]:
    return lambda ws: text


def _appended(extra: str) -> Callable[[Workspace], str]:
    return lambda ws: _valid_yaml(ws) + extra


# name -> (the config file's content, strings the error must name besides the file, commands)
BOTH, TRAIN = ("train", "inspect"), ("train",)
CONFIG_FILES: dict[str, tuple[Callable[[Workspace], bytes | str], tuple[str, ...], tuple[str, ...]]] = {
    "yaml_unclosed_flow": (_literal("model: {name_or_path: x\n  bad: [\n"), ("line",), BOTH),
    "yaml_tab_indent": (_literal("model:\n\tname_or_path: x\n"), ("line",), BOTH),
    "yaml_bad_indent": (_literal("model:\n  name_or_path: x\n   dtype: float32\n"), ("line",), BOTH),
    "yaml_nul_byte": (_literal("model: {name_or_path: x}\x00\n"), (), BOTH),
    "yaml_two_documents": (_literal("model: {name_or_path: x}\n---\ntrain: {lr: 1}\n"), (), BOTH),
    "yaml_deep_nesting": (_literal("model: " + "[" * 1000 + "]" * 1000 + "\n"), (), BOTH),
    "invalid_utf8": (_literal(b"model: {name_or_path: \xff\xfe}\n"), (), BOTH),
    "binary_garbage": (lambda ws: garbage(2048), (), BOTH),
    "utf16": (lambda ws: _valid_yaml(ws).encode("utf-16"), (), BOTH),
    "empty_file": (_literal(""), ("model.name_or_path",), BOTH),
    "comments_only": (_literal("# nothing here\n"), ("model.name_or_path",), BOTH),
    "null_document": (_literal("~\n"), ("model.name_or_path",), BOTH),
    "list_document": (_literal("- model\n- data\n"), (), BOTH),
    "scalar_document": (_literal("just some words\n"), (), BOTH),
    "duplicate_key": (_appended("train: {lr: 0.5}\n"), ("train",), ("inspect",)),
    "unknown_top_key": (_appended("bogus: 1\n"), ("'bogus'",), BOTH),
    "integer_key": (_appended("1: 2\n"), (), BOTH),
    "unknown_nested_key": (_yaml_with(train={"learning_rate": 1.0}), ("train.learning_rate",), BOTH),
    "unknown_method_option": (_yaml_with(method={"name": "lora", "rank": 8}), ("method.rank",), BOTH),
    "wrong_type_number": (_yaml_with(train={"lr": "fast"}), ("train.lr",), BOTH),
    "wrong_type_bool": (_yaml_with(train={"progress": "yes"}), ("train.progress",), BOTH),
    "wrong_type_list": (_yaml_with(train={"betas": 0.9}), ("train.betas",), BOTH),
    "wrong_type_string": (_yaml_with(model={"name_or_path": ["a", "b"]}), ("model.name_or_path",), BOTH),
    "section_not_mapping": (_yaml_with(train=5), ("train",), BOTH),
    "method_not_mapping": (_yaml_with(method="lora"), ("method",), BOTH),
    "bad_choice": (_yaml_with(train={"precision": "fp8"}), ("train.precision",), BOTH),
    "negative_lr": (_yaml_with(train={"lr": -1.0}), ("train.lr",), BOTH),
    "max_length_too_small": (_yaml_with(data={"max_length": 2}), ("data.max_length",), BOTH),
    "eval_fraction_over_one": (_yaml_with(data={"eval_fraction": 1.5}), ("data.eval_fraction",), BOTH),
    "unknown_method": (_yaml_with(method={"name": "qlora"}), ("method.name",), BOTH),
    "unknown_objective": (_yaml_with(objective={"name": "rlhf"}), ("objective.name",), BOTH),
    "method_option_bad_value": (_yaml_with(method={"name": "lora", "r": 0}), ("method", "r"), BOTH),
    "objective_option_bad_value": (
        _yaml_with(objective={**GRPO, "num_generations": 1}),
        ("objective", "num_generations"),
        BOTH,
    ),
    # errors about what a valid config names: the error names that, not the config file
    "model_path_missing": (
        _yaml_with(model={"name_or_path": "/nonexistent/fuzz-model"}),
        ("/nonexistent/fuzz-model",),
        TRAIN,
    ),
    "model_hub_id_offline": (
        _yaml_with(model={"name_or_path": "nobody/no-such-model"}),
        ("nobody/no-such-model",),
        TRAIN,
    ),
    "data_file_missing": (
        _yaml_with(data={"train": "/nonexistent/fuzz.jsonl"}),
        ("/nonexistent/fuzz.jsonl",),
        TRAIN,
    ),
    "device_not_present": (_yaml_with(model={"device": "cuda:99"}), ("model.device",), TRAIN),
    "device_not_a_name": (_yaml_with(model={"device": "gpu0"}), ("model.device",), TRAIN),
}
# name -> (overrides after a valid config, strings the error must name)
OVERRIDES: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "override_yaml_error": (["train.lr=["], ("train.lr",)),
    "override_without_equals": (["train.lr"], ("train.lr",)),
    "override_into_a_value": (["train.lr.x=1"], ("train.lr",)),
    "override_unknown_key": (["train.learning_rate=1"], ("train.learning_rate",)),
    "override_wrong_type": (["train.batch_size=two"], ("train.batch_size",)),
    "override_section_to_scalar": (["model=5"], ("model",)),
}


def config_cases() -> list[Case]:
    cases = []
    for name, (content, names, commands) in CONFIG_FILES.items():
        for command in commands:
            cases.append(Case("config", f"{name}@{command}", _config_build(name, content, names, command)))
    for name, (overrides, names) in OVERRIDES.items():
        cases.append(Case("config", f"{name}@train", _override_build(overrides, names)))
    cases += [
        Case("config", "missing_file@train", lambda ws: _path_only("train", ws.root / "nowhere.yaml")),
        Case("config", "missing_file@inspect", lambda ws: _path_only("inspect", ws.root / "nowhere.yaml")),
        Case("config", "folder_not_file@train", lambda ws: _path_only("train", _mkdir(ws.path("run.yaml")))),
        Case("config", "bom@inspect", _accepted_config(lambda ws: "\ufeff" + _valid_yaml(ws))),
        Case("config", "crlf@inspect", _accepted_config(lambda ws: _valid_yaml(ws).replace("\n", "\r\n"))),
    ]
    return cases


NAMED_IN_CONFIG = {
    "model_path_missing",
    "model_hub_id_offline",
    "data_file_missing",
    "device_not_present",
    "device_not_a_name",
}


def _config_build(
    name: str, content, names: tuple[str, ...], command: str
) -> Callable[[Workspace], Invocation]:
    def build(ws: Workspace) -> Invocation:
        cfg = write(ws.path("run.yaml"), content(ws))
        earlier = ws.root / "earlier-run"
        named = names if name in NAMED_IN_CONFIG else (str(cfg), *names)
        return Invocation([command, str(cfg)], named, (cfg, earlier) if earlier.exists() else (cfg,))

    return build


def _override_build(overrides: list[str], names: tuple[str, ...]) -> Callable[[Workspace], Invocation]:
    def build(ws: Workspace) -> Invocation:
        cfg = write(ws.path("run.yaml"), _valid_yaml(ws))
        return Invocation(["train", str(cfg), *overrides], names, (cfg, ws.root / "earlier-run"))

    return build


def _path_only(command: str, path: Path) -> Invocation:
    return Invocation([command, str(path)], (str(path),))


def _accepted_config(content: Callable[[Workspace], str]) -> Callable[[Workspace], Invocation]:
    def build(ws: Workspace) -> Invocation:
        cfg = write(ws.path("run.yaml"), content(ws))
        return Invocation(["inspect", str(cfg)], guarded=(cfg,), accepted=True, says=(r"trainable params",))

    return build


# ---------------------------------------------------------------- adapter folders


def _edit_json(name: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        data = json.loads((folder / name).read_text())
        change(data)
        (folder / name).write_text(json.dumps(data))

    return mutate


def _config_set(key: str, value) -> Callable[[Path], None]:
    return _edit_json("adapter_config.json", lambda c: c.__setitem__(key, value))


def _config_drop(key: str) -> Callable[[Path], None]:
    return _edit_json("adapter_config.json", lambda c: c.pop(key, None))


def _cut(name: str, keep: Callable[[int], int]) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: keep(len(data))])

    return mutate


def _replace_file(name: str, content: bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_bytes(content)


def _remove(name: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).unlink()


def _edit_tensors(
    change: Callable[[dict], None], name: str = "adapter_model.safetensors"
) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(folder / name)
        change(tensors)
        save_file(tensors, folder / name)

    return mutate


def _first_tensor_shape(tensors: dict) -> None:
    import torch

    tensors[sorted(tensors)[0]] = torch.zeros(3, 3)


def _drop_first_tensor(tensors: dict) -> None:
    tensors.pop(sorted(tensors)[0])


def _extra_tensor(tensors: dict) -> None:
    import torch

    tensors["base_model.model.stray.weight"] = torch.zeros(2)


WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
# (kind, name) -> (mutation of a copy of the adapter folder, the file the error must name: "" for the
# folder, a file name inside it, or an absolute path)
ADAPTER_MUTATIONS: dict[tuple[str, str], tuple[Callable[[Path], None], str | tuple[str, ...]]] = {
    ("lora", "no_adapter_config"): (_remove(CONFIG), ""),
    ("lora", "no_weights"): (_remove(WEIGHTS), ("", WEIGHTS)),
    ("lora", "weights_are_a_folder"): (lambda f: (_remove(WEIGHTS)(f), _mkdir(f / WEIGHTS)), ("", WEIGHTS)),
    ("lora", "weights_truncated"): (_cut(WEIGHTS, lambda n: n // 2), WEIGHTS),
    ("lora", "weights_empty"): (_replace_file(WEIGHTS, b""), WEIGHTS),
    ("lora", "weights_garbage"): (_replace_file(WEIGHTS, garbage(512)), WEIGHTS),
    ("lora", "weights_wrong_shape"): (_edit_tensors(_first_tensor_shape), WEIGHTS),
    ("lora", "weights_missing_tensor"): (_edit_tensors(_drop_first_tensor), WEIGHTS),
    ("lora", "weights_extra_tensor"): (_edit_tensors(_extra_tensor), WEIGHTS),
    ("lora", "config_empty"): (_replace_file(CONFIG, b""), CONFIG),
    ("lora", "config_truncated"): (_cut(CONFIG, lambda n: n // 2), CONFIG),
    ("lora", "config_not_an_object"): (_replace_file(CONFIG, b"[1, 2]"), CONFIG),
    ("lora", "config_invalid_utf8"): (_replace_file(CONFIG, b'{"peft_type": "\xff\xfe"}'), CONFIG),
    ("lora", "base_missing"): (
        _config_set("base_model_name_or_path", "/nonexistent/fuzz-base"),
        "/nonexistent/fuzz-base",
    ),
    ("lora", "base_hub_id_offline"): (
        _config_set("base_model_name_or_path", "nobody/no-such-model"),
        "nobody/no-such-model",
    ),
    ("lora", "base_not_a_string"): (_config_set("base_model_name_or_path", 5), CONFIG),
    ("lora", "base_null"): (_config_set("base_model_name_or_path", None), CONFIG),
    ("lora", "peft_type_unknown"): (_config_set("peft_type", "IA3"), ""),
    ("lora", "peft_type_absent"): (_config_drop("peft_type"), ""),
    ("lora", "tunelab_method_unknown"): (_config_set("tunelab_method", "bogus"), ""),
    ("lora", "r_absent"): (_config_drop("r"), CONFIG),
    ("lora", "r_not_an_integer"): (_config_set("r", "four"), CONFIG),
    ("lora", "target_modules_not_a_list"): (_config_set("target_modules", 5), CONFIG),
    ("lora", "unsupported_option"): (_config_set("use_dora", True), CONFIG),
    ("prefix", "num_layers_absent"): (_config_drop("num_layers"), CONFIG),
    ("prefix", "num_layers_wrong"): (_config_set("num_layers", 999), ""),
    ("prefix", "weights_truncated"): (_cut(WEIGHTS, lambda n: n // 2), WEIGHTS),
    ("prefix", "weights_wrong_shape"): (_edit_tensors(_first_tensor_shape), WEIGHTS),
    ("adapter", "hidden_size_absent"): (_config_drop("hidden_size"), CONFIG),
    ("adapter", "placement_unknown"): (_config_set("placement", "nowhere"), CONFIG),
    ("adapter", "weights_truncated"): (_cut(WEIGHTS, lambda n: n // 2), WEIGHTS),
    ("adapter", "weights_wrong_shape"): (_edit_tensors(_first_tensor_shape), WEIGHTS),
}
ADAPTER_COMMANDS = {
    "lora": ("generate", "eval", "merge"),
    "prefix": ("generate", "eval"),
    "adapter": ("generate", "eval"),
}


def adapter_invocation(ws: Workspace, kind: str, mutate: Callable[[Path], None], named: str, command: str):
    folder = ws.root / "adapter"
    shutil.copytree(ws.runs[kind] / "final", folder)
    mutate(folder)
    names = (str(folder), *named[1:]) if isinstance(named, tuple) else (_adapter_names(folder, named),)
    guarded: tuple[Path, ...] = (folder,)
    if command == "generate":
        argv = ["generate", str(folder), "--prompt", "Reverse the words.", "--max-new-tokens", "2"]
    elif command == "eval":
        data = write(ws.path("data", "eval.jsonl"), to_jsonl(FORMATS["instruction"].valid()))
        argv, guarded = ["eval", str(folder), "--data", str(data), "--no-generate"], (folder, data)
    else:
        out = earlier_run(ws.root / "merged")  # an earlier merge at --out: kept whole
        argv, guarded = ["merge", str(folder), "--out", str(out)], (folder, out)
    return Invocation(argv, names, guarded)


def _adapter_names(folder: Path, named: str) -> str:
    """What an error must hold for `named`: the adapter folder for an empty name, the file in it for
    a bare file name, a path (a base model) as it is. (In the table, ("", FILE) names the folder
    and the file apart, as an error about a missing file does.)"""
    return named if "/" in named else str(folder / named) if named else str(folder)


def adapter_cases() -> list[Case]:
    cases = []
    for (kind, name), (mutate, named) in ADAPTER_MUTATIONS.items():
        for command in ADAPTER_COMMANDS[kind]:
            build = _adapter_build(kind, mutate, named, command)
            cases.append(Case("adapter", f"{kind}/{name}@{command}", build))
    for kind in ("prefix", "adapter"):  # only LoRA merges: said before any file is read
        mutate, _ = ADAPTER_MUTATIONS[(kind, "weights_truncated")]
        cases.append(
            Case("adapter", f"{kind}/weights_truncated@merge", _adapter_build(kind, mutate, "", "merge"))
        )

    def run_folder(ws: Workspace) -> Invocation:
        run = ws.root / "run"
        shutil.copytree(ws.runs["lora"], run)
        (run / "final" / WEIGHTS).unlink()
        return Invocation(["generate", str(run), "--prompt", "hi"], (str(run / "final"), WEIGHTS), (run,))

    cases.append(Case("adapter", "lora/run_folder_without_weights@generate", run_folder))
    return cases


def _adapter_build(kind, mutate, named, command) -> Callable[[Workspace], Invocation]:
    return lambda ws: adapter_invocation(ws, kind, mutate, named, command)


# ---------------------------------------------------------------- checkpoints for --resume


def resumable(ws: Workspace, overrides: tuple[str, ...] = ()) -> tuple[Path, list[str]]:
    """A copy of the LoRA run (checkpoints step-1 and step-2) and the `train ... --resume` argv."""
    run = ws.root / "run"
    shutil.copytree(ws.runs["lora"], run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["output_dir"] = str(run)
    cfg = write(ws.path("resume.yaml"), yaml.safe_dump(config, sort_keys=False))
    return run, ["train", str(cfg), *overrides, "--resume"]


def _state(change: Callable[[dict], None]) -> Callable[[Path], None]:
    return _edit_json("state.json", change)


# name -> (mutation of the latest checkpoint step-2, the file the error must name ("" = the
# checkpoint folder), overrides of the resumed run)
CHECKPOINT_MUTATIONS: dict[str, tuple[Callable[[Path], None], str, tuple[str, ...]]] = {
    "trainable_truncated": (_cut("trainable.safetensors", lambda n: n // 2), "trainable.safetensors", ()),
    "trainable_empty": (_replace_file("trainable.safetensors", b""), "trainable.safetensors", ()),
    "trainable_garbage": (_replace_file("trainable.safetensors", garbage(512)), "trainable.safetensors", ()),
    "trainable_missing": (_remove("trainable.safetensors"), "trainable.safetensors", ()),
    "optimizer_truncated": (_cut("optimizer.safetensors", lambda n: n // 2), "optimizer.safetensors", ()),
    "optimizer_missing": (_remove("optimizer.safetensors"), "optimizer.safetensors", ()),
    "optimizer_json_garbage": (_replace_file("optimizer.json", b"{not json"), "optimizer.json", ()),
    "optimizer_json_missing": (_remove("optimizer.json"), "optimizer.json", ()),
    "rng_truncated": (_cut("rng.safetensors", lambda n: n // 2), "rng.safetensors", ()),
    "state_missing": (_remove("state.json"), "state.json", ()),
    "state_garbage": (_replace_file("state.json", b"\x00\xff garbage"), "state.json", ()),
    "state_not_an_object": (_replace_file("state.json", b"[]"), "state.json", ()),
    "state_without_step": (_state(lambda s: s.pop("step")), "state.json", ()),
    "state_step_not_an_integer": (_state(lambda s: s.__setitem__("step", "two")), "state.json", ()),
    "empty_folder": (lambda c: [p.unlink() for p in c.iterdir()], "", ()),
    "other_method_options": (lambda c: None, "trainable.safetensors", ("method.r=8",)),
    "other_method": (lambda c: None, "trainable.safetensors", ("method={name: full}",)),
}


def checkpoint_cases() -> list[Case]:
    def make(mutate, named: str, overrides: tuple[str, ...]) -> Callable[[Workspace], Invocation]:
        def build(ws: Workspace) -> Invocation:
            run, argv = resumable(ws, overrides)
            checkpoint = run / "checkpoints" / "step-2"
            mutate(checkpoint)
            return Invocation(argv, (str(checkpoint / named) if named else str(checkpoint),), (run,))

        return build

    cases = [Case("checkpoint", f"{name}@train", make(*spec)) for name, spec in CHECKPOINT_MUTATIONS.items()]

    def leftover_tmp(ws: Workspace) -> Invocation:
        """An unfinished `step-3.tmp/` (a crash mid-write) is not a checkpoint: resume from step-2."""
        run, argv = resumable(ws)
        write(run / "checkpoints" / "step-3.tmp" / "trainable.safetensors", garbage(100))
        return Invocation(argv, accepted=True, says=(r"resumed from .*step-2",))

    return cases + [Case("checkpoint", "leftover_tmp_folder@train", leftover_tmp)]


# ---------------------------------------------------------------- records longer than max_length

LONG = " ".join(["red owl sun blue fox"] * 60)  # a few hundred tokens


def long_case(name: str, records: list, fmt: str, max_length: int, says: tuple[str, ...], **extra) -> Case:
    """A training run on `records` with `data.max_length`; accepted unless `says` is empty."""

    def build(ws: Workspace) -> Invocation:
        data = write(ws.path("data", "train.jsonl"), to_jsonl(records))
        objective = FORMATS[fmt].objective
        sections = {
            "data": {"format": fmt, "max_length": max_length, "template": "plain", **extra.get("data", {})}
        }
        config = run_config(ws, data, ws.root / "out", objective=objective, **sections)
        cfg = write_config(ws, config)
        if not says:
            return Invocation(["train", str(cfg)], (str(data),), (data, cfg))
        return Invocation(["train", str(cfg)], guarded=(data,), accepted=True, says=says)

    return Case("long", f"{name}@train", build)


def long_cases() -> list[Case]:
    short = FORMATS["instruction"].valid()
    long_output = {"instruction": "Repeat the text.", "output": LONG}
    long_prompt = {"instruction": LONG, "output": "red"}
    pair = {"prompt": "Repeat.", "chosen": LONG, "rejected": "red"}
    cases = [
        long_case(
            "sft_responses_truncated",
            short + [long_output] * 2,
            "instruction",
            32,
            (r"data: truncated 2 of 5 training examples to 32 tokens",),
        ),
        long_case(
            "sft_prompt_fills_max_length",
            short + [long_prompt],
            "instruction",
            32,
            (r"data: dropped 1 training examples with no response tokens",),
        ),
        long_case("sft_every_record_too_long", [long_prompt] * 3, "instruction", 32, ()),
        long_case(
            "sft_one_huge_record",
            short + [{"instruction": "Repeat.", "output": "red owl " * 50_000}],
            "instruction",
            32,
            (r"data: truncated 1 of 4 training examples",),
        ),
        long_case(
            "chat_truncated",
            FORMATS["chat"].valid() + [_chat("Repeat.", LONG)],
            "chat",
            32,
            (r"data: truncated 1 of 4",),
        ),
        long_case(
            "text_truncated",
            FORMATS["text"].valid() + [{"text": LONG}],
            "text",
            32,
            (r"data: truncated 1 of 4",),
        ),
        long_case(
            "pairs_truncated",
            FORMATS["preference"].valid() + [pair],
            "preference",
            32,
            (r"data: truncated 1 of 4 training pairs",),
        ),
        long_case(
            "pairs_response_cut_away",
            FORMATS["preference"].valid() + [{**pair, "prompt": LONG}],
            "preference",
            32,
            (r"data: dropped 1 training pairs",),
        ),
        long_case(
            "prompts_too_long",
            FORMATS["prompt"].valid() + [{"prompt": LONG}],
            "prompt",
            32,
            (r"data: dropped 1 training prompts longer than",),
        ),
    ]

    def eval_truncates(ws: Workspace) -> Invocation:
        data = write(ws.path("data", "eval.jsonl"), to_jsonl(short + [long_output]))
        argv = ["eval", str(ws.model), "--data", str(data), "--max-length", "32", "--no-generate"]
        return Invocation(argv, guarded=(data,), accepted=True, says=(r"truncat",))

    def held_out_truncated(ws: Workspace) -> Invocation:
        train = write(ws.path("data", "train.jsonl"), to_jsonl(short))
        held_out = write(ws.path("data", "eval.jsonl"), to_jsonl(short + [long_output]))
        data = {"eval": str(held_out), "max_length": 32, "template": "plain"}
        cfg = write_config(ws, run_config(ws, train, ws.root / "out", data=data))
        return Invocation(["train", str(cfg)], accepted=True, says=(r"truncated .*eval|eval.*truncated",))

    return cases + [
        Case("long", "eval_command_truncates@eval", eval_truncates),
        Case("long", "held_out_examples_truncated@train", held_out_truncated),
    ]


# ---------------------------------------------------------------- evaluation sets that end up empty


def eval_set_cases() -> list[Case]:
    train_records = FORMATS["instruction"].valid()

    def held_out(name: str, content: bytes, suffix: str = ".jsonl", fmt: str = "instruction", **data) -> Case:
        def build(ws: Workspace) -> Invocation:
            train = write(ws.path("data", "train.jsonl"), to_jsonl(FORMATS[fmt].valid()))
            evaluation = write(ws.path("data", f"eval{suffix}"), content)
            out = earlier_run(ws.root / "earlier-run")
            sections = {"eval": str(evaluation), "format": fmt, "template": "plain", **data}
            config = run_config(ws, train, out, objective=FORMATS[fmt].objective, data=sections)
            cfg = write_config(ws, config)
            return Invocation(["train", str(cfg)], (str(evaluation),), (out, train, evaluation))

        return Case("eval-set", f"{name}@train", build)

    def fraction_takes_all(ws: Workspace) -> Invocation:
        train = write(ws.path("data", "train.jsonl"), to_jsonl(train_records[:1]))
        out = earlier_run(ws.root / "earlier-run")
        cfg = write_config(ws, run_config(ws, train, out, data={"eval_fraction": 0.5}))
        return Invocation(["train", str(cfg)], (str(train), "eval_fraction"), (out, train))

    def eval_command(name: str, content: bytes, *args: str) -> Case:
        def build(ws: Workspace) -> Invocation:
            data = write(ws.path("data", "eval.jsonl"), content)
            argv = ["eval", str(ws.model), "--data", str(data), "--no-generate", *args]
            return Invocation(argv, (str(data),), (data,))

        return Case("eval-set", name, build)

    def run_without_eval_data(ws: Workspace) -> Invocation:
        run = ws.root / "run"
        shutil.copytree(ws.runs["lora"], run)
        return Invocation(["eval", str(run)], (str(run),), (run,))

    too_long = to_jsonl([{"instruction": LONG, "output": "red"}])
    return [
        held_out("held_out_empty_file", b""),
        held_out("held_out_whitespace_only", b"\n \n"),
        held_out("held_out_csv_header_only", b"instruction,input,output\n", ".csv"),
        held_out("held_out_parquet_no_rows", _empty_parquet(), ".parquet"),
        held_out("held_out_all_bad_skipped", b'{"question": "a"}\n', skip_bad_records=True),
        held_out("held_out_all_too_long", too_long, max_length=32),
        held_out("held_out_pairs_empty_file", b"", fmt="preference"),
        held_out("held_out_prompts_empty_file", b"", fmt="prompt"),
        Case("eval-set", "eval_fraction_takes_every_record@train", fraction_takes_all),
        eval_command("eval_command_empty_file@eval", b""),
        eval_command("eval_command_limit_zero@eval", to_jsonl(train_records), "--limit", "0"),
        eval_command("eval_command_all_too_long@eval", too_long, "--max-length", "16"),
        Case("eval-set", "run_without_eval_data@eval", run_without_eval_data),
    ]


# ---------------------------------------------------------------- the corpus


def all_cases() -> list[Case]:
    cases = (
        data_cases() + config_cases() + adapter_cases() + checkpoint_cases() + long_cases() + eval_set_cases()
    )
    ids = [c.id for c in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    assert not duplicates, f"duplicate case ids: {duplicates}"
    return cases


def counts(cases: list[Case] | None = None) -> dict[str, int]:
    """Cases per surface."""
    cases = all_cases() if cases is None else cases
    return {surface: sum(c.surface == surface for c in cases) for surface in SURFACES}


# The cases run in a real `python -m tunelab` subprocess as well: at least one per surface.
SUBPROCESS_CASES = (
    "data/jsonl/instruction/truncated@train",
    "config/unknown_nested_key@train",
    "adapter/lora/weights_wrong_shape@generate",
    "checkpoint/other_method_options@train",
    "long/sft_responses_truncated@train",
    "eval-set/held_out_empty_file@train",
)


# ---------------------------------------------------------------- what tunelab gets wrong today

# Case-id pattern (fnmatch) -> what happens and where the fix belongs. Delete an entry when its fix
# lands (its cases then XPASS, which fails the strict xfail).
KNOWN_BUGS: dict[str, str] = {}


if __name__ == "__main__":
    table = counts()
    for surface, count in table.items():
        print(f"{surface:<12} {count}")
    print(f"{'total':<12} {sum(table.values())}")

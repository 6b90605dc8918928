"""Reading records from local files (JSONL, JSON, CSV, Parquet) or hub data sets, and checking them.

Each record comes back with its number in the source (the line for JSONL, counted from 1; the
row for JSON/CSV/Parquet, counted from 1), so that a bad record can be named exactly.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from tunelab.errors import DataError

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")

Checked = TypeVar("Checked")


def is_local(source: str) -> bool:
    """A local file path (as opposed to a hub data set id)."""
    return (
        Path(source).suffix.lower() in LOCAL_SUFFIXES
        or Path(source).exists()
        or source.startswith((".", "/"))
    )


def read_records(
    source: str, split: str = "train", skip_bad: bool = False
) -> tuple[list[tuple[int, dict]], int]:
    """(record number, record) pairs from a local file or a hub data set split, and the number of
    unreadable records skipped (malformed JSON lines; only with `skip_bad`, else they are errors)."""
    if not is_local(source):
        return _read_hub(source, split), 0
    path = Path(source)
    if not path.is_file():
        raise DataError(source, None, None, "file does not exist")
    suffix = path.suffix.lower()
    skipped = 0
    if suffix == ".jsonl":
        records, skipped = _read_jsonl(path, skip_bad)
    elif suffix == ".json":
        records = _read_json(path)
    elif suffix == ".csv":
        records = _read_csv(path)
    elif suffix == ".parquet":
        records = _read_parquet(path)
    else:
        raise DataError(source, None, None, f"unknown data file type {suffix!r}; use one of {LOCAL_SUFFIXES}")
    if not records and not skipped:
        raise DataError(source, None, None, "holds no records (empty file)")
    return records, skipped


def check_records(
    source: str,
    records: list[tuple[int, dict]],
    skip_bad: bool,
    check: Callable[[dict, str, int], Checked],
) -> tuple[list[Checked], int]:
    """`check(record, source, number)` of every record, and how many raised `DataError` and were
    skipped (with `skip_bad`; else the first error stops). A `DataError` when none is left. A
    record holding a string that is not Unicode text (a lone surrogate escape such as `\\ud800`,
    which JSON allows) is bad whatever its format."""
    checked, skipped = [], 0
    for number, record in records:
        try:
            _check_unicode(record, source, number)
            checked.append(check(record, source, number))
        except DataError:
            if not skip_bad:
                raise
            skipped += 1
    if not checked:
        raise DataError(source, None, None, "no usable records")
    return checked, skipped


# ------------------------------------------------------------------ text and its encoding

_SURROGATE = re.compile("[\\ud800-\\udfff]")
UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
UTF8_BOM = codecs.BOM_UTF8
CSV_FIELD_LIMIT = 1 << 30
"""The largest CSV cell read, in characters (Python's default, 131,072, is a long document)."""


def _check_unicode(value, source: str, number: int, where: str | None = None) -> None:
    """A `DataError` naming the field (`messages[1].content`) of the first string in `value`
    (a record, or anything in it) that cannot be encoded as UTF-8 (it holds a lone surrogate)."""
    if isinstance(value, str):
        found = _SURROGATE.search(value)
        if found:
            problem = f"not Unicode text: a lone surrogate {found.group()!r} (an unpaired \\u escape)"
            raise DataError(source, number, where, problem)
    elif isinstance(value, dict):
        for key, item in value.items():
            name = str(key) if where is None else f"{where}.{key}"
            _check_unicode(key, source, number, name)
            _check_unicode(item, source, number, name)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_unicode(item, source, number, f"{where or ''}[{i}]")


def _not_utf8(data: bytes, err: UnicodeDecodeError) -> str:
    """What is wrong with `data`, which is not UTF-8 text: the first bad byte and its line."""
    if data.startswith(UTF16_BOMS):
        return "is UTF-16 text, not UTF-8: save it as UTF-8"
    line = data.count(b"\n", 0, err.start) + 1
    column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
    return f"not UTF-8 text: byte 0x{data[err.start]:02x} at line {line}, column {column} (a binary file?)"


def _read_text(path: Path) -> str:
    """The file's UTF-8 text (a leading byte-order mark dropped); a `DataError` when it is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(str(path), None, None, _not_utf8(data, err)) from None


def _json_problem(err: ValueError | RecursionError) -> str:
    """One line saying why `json.loads` refused a text."""
    if isinstance(err, json.JSONDecodeError):
        return f"not valid JSON ({err.msg})"
    if isinstance(err, RecursionError):
        return "not valid JSON (nested too deeply)"
    return f"not valid JSON ({' '.join(str(err).split(':')[0].split())})"  # e.g. a 5,000-digit number


def _read_jsonl(path: Path, skip_bad: bool) -> tuple[list[tuple[int, dict]], int]:
    records, skipped = [], 0
    data = path.read_bytes()
    if data.startswith(UTF16_BOMS):
        raise DataError(str(path), None, None, "is UTF-16 text, not UTF-8: save it as UTF-8")
    if data.startswith(UTF8_BOM):
        data = data[len(UTF8_BOM) :]
    for line_number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            if skip_bad:
                skipped += 1
                continue
            problem = (
                f"not UTF-8 text: byte 0x{raw[err.start]:02x} at column {err.start + 1} (a binary file?)"
            )
            raise DataError(str(path), line_number, None, problem) from None
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as err:
            if skip_bad:
                skipped += 1
                continue
            raise DataError(str(path), line_number, None, _json_problem(err)) from None
        if not isinstance(record, dict):
            if skip_bad:
                skipped += 1
                continue
            raise DataError(str(path), line_number, None, "expected a JSON object")
        records.append((line_number, record))
    return records, skipped


def _read_json(path: Path) -> list[tuple[int, dict]]:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        where = f"at line {err.lineno}, column {err.colno}"
        raise DataError(str(path), None, None, f"not valid JSON {where} ({err.msg})") from None
    except (ValueError, RecursionError) as err:
        raise DataError(str(path), None, None, _json_problem(err)) from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]}
    if not isinstance(data, list):
        raise DataError(str(path), None, None, "expected a JSON list of objects")
    for i, record in enumerate(data, start=1):
        if not isinstance(record, dict):
            raise DataError(str(path), i, None, "expected a JSON object")
    return list(enumerate(data, start=1))


def _read_csv(path: Path) -> list[tuple[int, dict]]:
    """Rows as {header: cell}; record N is the N-th row after the header. A row with more cells
    than the header, a quote left open and a cell over `CSV_FIELD_LIMIT` are errors."""
    text = _read_text(path)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    records: list[tuple[int, dict]] = []
    header: list[str] | None = None
    previous = csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    try:
        while True:
            first_line = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as err:
                number = len(records) + 1 if header is not None else None
                problem = f"not valid CSV in the row from line {first_line} ({err})"
                raise DataError(str(path), number, None, problem) from None
            if not row:
                continue  # a blank line
            if header is None:
                header = row
                continue
            number = len(records) + 1
            if len(row) > len(header):
                problem = f"{len(row)} cells, the header has {len(header)} (line {first_line})"
                raise DataError(str(path), number, None, problem)
            records.append(
                (number, {key: (row[i] if i < len(row) else None) for i, key in enumerate(header)})
            )
    finally:
        csv.field_size_limit(previous)
    return records


def _read_parquet(path: Path) -> list[tuple[int, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as err:
        problem = " ".join(str(err).split()) or type(err).__name__
        raise DataError(str(path), None, None, f"not a readable Parquet file ({problem})") from None
    return list(enumerate(rows, start=1))


def _read_hub(source: str, split: str) -> list[tuple[int, dict]]:
    import datasets

    try:
        dataset = datasets.load_dataset(source, split=split)
    except Exception as err:  # noqa: BLE001 - datasets raises many kinds; we report them as one
        raise DataError(source, None, None, f"cannot load hub data set split {split!r}: {err}") from None
    return [(i, dict(row)) for i, row in enumerate(dataset, start=1)]

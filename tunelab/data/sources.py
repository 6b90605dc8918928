"""Reading records from local files (JSONL, JSON, CSV, Parquet) or hub data sets, and checking them.

Each record comes back with its number in the source (the line for JSONL, counted from 1; the
row for JSON/CSV/Parquet, counted from 1), so that a bad record can be named exactly.

A source of a mixture (`tunelab.config.SourceConfig`) is one of:

- a local file, or a glob of them (`data/*.jsonl`: the files in sorted order, each named in errors);
- a local folder or a hub data set id, read by `datasets.load_dataset(path, name=subset,
  split=split, revision=revision, data_files=data_files)` (a folder with a README.md `configs:`
  header is read by subset name, offline, as the hub would read it);
- with `streaming: true`, a hub data set read as a stream through a seeded shuffle buffer
  (`IterableDataset.shuffle(seed, buffer_size)`): the same seed gives the same records in the same
  order; `records` stops the stream after that many.

`columns` renames a source's columns (`{question: instruction}`) before its records are checked.
"""

from __future__ import annotations

import codecs
import csv
import glob
import hashlib
import io
import itertools
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from tunelab.config import SourceConfig
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


def is_glob(path: str) -> bool:
    """A local path with wildcards (`data/*.jsonl`)."""
    return any(c in path for c in "*?[") and Path(path).suffix.lower() in LOCAL_SUFFIXES


def reads_with_datasets(src: SourceConfig) -> bool:
    """Is `src` read by `datasets.load_dataset` (a hub id or a local folder), not as local files?"""
    return src.streaming or Path(src.path).is_dir() or not (is_local(src.path) or is_glob(src.path))


def source_name(src: SourceConfig) -> str:
    """How errors and the data report name a source: its path, with subset and split for a data set."""
    if not reads_with_datasets(src):
        return src.path
    details = [f"subset {src.subset}"] if src.subset else []
    details += [f"split {src.split}"] + ([f"revision {src.revision}"] if src.revision else [])
    return f"{src.path} ({', '.join(details)})"


def local_files(src: SourceConfig) -> list[str]:
    """The files of a local source: the file itself, or the glob's matches in sorted order."""
    if not is_glob(src.path):
        return [src.path]
    files = sorted(glob.glob(str(Path(src.path).expanduser())))
    if not files:
        raise DataError(src.path, None, None, "no file matches this pattern")
    return files


def read_source(src: SourceConfig, skip_bad: bool, seed: int) -> tuple[list[tuple[str, list]], int]:
    """The records of a source as parts (name for errors, (record number, record) pairs), one per
    file of a glob, and the number of unreadable records skipped. `src.split` must be set."""
    if reads_with_datasets(src):
        return [(source_name(src), _load_dataset(src, seed))], 0
    parts, skipped = [], 0
    for path in local_files(src):
        records, unreadable = read_records(path, src.split or "train", skip_bad)
        parts.append((path, records))
        skipped += unreadable
    return parts, skipped


def map_columns(record: dict, columns: dict[str, str] | None, source: str, number: int) -> dict:
    """`record` with its columns renamed by `columns` ({old: new}); a column it lacks is an error."""
    if not columns:
        return record
    renamed = {key: value for key, value in record.items() if key not in columns}
    for old, new in columns.items():
        if old not in record:
            raise DataError(source, number, old, f"missing column (renamed to {new!r} by columns)")
        renamed[new] = record[old]
    return renamed


def fingerprint(src: SourceConfig) -> str:
    """A hash of what `src` holds: the bytes of its local files; the fingerprint `datasets` gives a
    loaded data set; for a stream, its description only (pin `revision` to keep it meaningful)."""
    digest = hashlib.sha256()
    if src.streaming:
        digest.update(repr((src.path, src.subset, src.split, src.revision, src.data_files)).encode())
    elif reads_with_datasets(src):
        digest.update(_open_dataset(src)._fingerprint.encode())
    else:
        for path in local_files(src):
            try:
                with open(path, "rb") as handle:
                    while chunk := handle.read(1 << 22):
                        digest.update(chunk)
            except OSError:  # reading it later names the problem
                digest.update(b"unreadable")
            digest.update(b"\0file\0")
    return digest.hexdigest()


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
    return _load_dataset(SourceConfig(path=source, split=split), seed=0)


def _open_dataset(src: SourceConfig):
    """`datasets.load_dataset` of the source (a `Dataset`, or an `IterableDataset` when streaming)."""
    import datasets

    try:
        return datasets.load_dataset(
            src.path,
            name=src.subset,
            split=src.split,
            revision=src.revision,
            data_files=src.data_files,
            streaming=src.streaming,
        )
    except Exception as err:  # noqa: BLE001 - datasets raises many kinds; we report them as one
        problem = " ".join(str(err).split()) or type(err).__name__
        raise DataError(source_name(src), None, None, f"cannot load the data set: {problem}") from None


def _load_dataset(src: SourceConfig, seed: int) -> list[tuple[int, dict]]:
    """(record number, record) pairs of a data set read by `datasets`; a stream is shuffled through
    a buffer seeded by `seed` and stops after `src.records` records (when set)."""
    dataset = _open_dataset(src)
    if src.streaming:
        dataset = dataset.shuffle(seed=seed, buffer_size=src.shuffle_buffer)
        dataset = itertools.islice(dataset, src.records)
    return [(i, dict(row)) for i, row in enumerate(dataset, start=1)]

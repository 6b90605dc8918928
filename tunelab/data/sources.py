"""Reading records from local files (JSONL, JSON, CSV, Parquet) or hub data sets, and checking them.

Each record comes back with its number in the source (the line for JSONL, counted from 1; the
row for JSON/CSV/Parquet, counted from 1), so that a bad record can be named exactly.
"""

from __future__ import annotations

import csv
import json
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
        with path.open(newline="", encoding="utf-8") as handle:
            records = [(i, dict(row)) for i, row in enumerate(csv.DictReader(handle), start=1)]
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        records = [(i, row) for i, row in enumerate(pq.read_table(path).to_pylist(), start=1)]
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
    skipped (with `skip_bad`; else the first error stops). A `DataError` when none is left."""
    checked, skipped = [], 0
    for number, record in records:
        try:
            checked.append(check(record, source, number))
        except DataError:
            if not skip_bad:
                raise
            skipped += 1
    if not checked:
        raise DataError(source, None, None, "no usable records")
    return checked, skipped


def _read_jsonl(path: Path, skip_bad: bool) -> tuple[list[tuple[int, dict]], int]:
    records, skipped = [], 0
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                if skip_bad:
                    skipped += 1
                    continue
                raise DataError(str(path), line_number, None, f"not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                if skip_bad:
                    skipped += 1
                    continue
                raise DataError(str(path), line_number, None, "expected a JSON object")
            records.append((line_number, record))
    return records, skipped


def _read_json(path: Path) -> list[tuple[int, dict]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(str(path), err.lineno, None, f"not valid JSON ({err.msg})") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]}
    if not isinstance(data, list):
        raise DataError(str(path), None, None, "expected a JSON list of objects")
    for i, record in enumerate(data, start=1):
        if not isinstance(record, dict):
            raise DataError(str(path), i, None, "expected a JSON object")
    return list(enumerate(data, start=1))


def _read_hub(source: str, split: str) -> list[tuple[int, dict]]:
    import datasets

    try:
        dataset = datasets.load_dataset(source, split=split)
    except Exception as err:  # noqa: BLE001 - datasets raises many kinds; we report them as one
        raise DataError(source, None, None, f"cannot load hub data set split {split!r}: {err}") from None
    return [(i, dict(row)) for i, row in enumerate(dataset, start=1)]

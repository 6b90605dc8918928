"""Entries on disk that several processes may build at once: one builds, the others wait and read.

An entry is the folder `FOLDER/KEY/`. The first process to take the lock `FOLDER/KEY.lock`
(`fcntl.flock`) builds the entry in `KEY.tmp-PID/` and renames it into place (`publish`), so a
reader never sees half an entry and a build killed midway leaves only its `.tmp-PID` folder. Every
other process (every rank, every later run) waits on the lock, then reads the finished entry. A
cache folder on a network file system needs working `flock`. Used by the token cache
(`tunelab.data.cache`) and the converted GGUF models (`tunelab.export.gguf_in`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from tunelab.errors import TunelabError


@contextlib.contextmanager
def locked(folder: Path, key: str, setting: str, what: str, turn_off: str) -> Iterator[Path]:
    """Hold the entry's lock (waiting for whoever builds it) and give the entry's folder. For the
    error an unwritable folder raises: `setting` names where the folder comes from, `what` the
    cache, `turn_off` how to do without it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / f"{key}.lock", "a+")  # noqa: SIM115 - closed below
    except OSError as err:
        problem = f"cannot write the {what} in {folder} ({err.strerror or err}); {turn_off}"
        raise TunelabError(f"{setting}: {problem}") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield folder / key
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def new_entry(entry: Path) -> Path:
    """An empty folder to build `entry` in (renamed into place by `publish`)."""
    building = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    return building


def publish(building: Path, entry: Path, meta: dict) -> None:
    """Write `meta.json` and move the finished entry into place (atomically)."""
    (building / "meta.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(entry, ignore_errors=True)
    os.replace(building, entry)


def read_meta(entry: Path, version: int) -> dict | None:
    """The finished entry's `meta.json`, or None when there is no finished entry of `version`."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if meta.get("version") == version else None

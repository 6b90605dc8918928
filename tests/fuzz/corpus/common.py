"""The corpus's shared pieces: the surfaces, a workspace, an invocation, a case, and writers."""

from __future__ import annotations

import random
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


# ---------------------------------------------------------------- what tunelab gets wrong today

# Case-id pattern (fnmatch) -> what happens and where the fix belongs. Delete an entry when its fix
# lands (its cases then XPASS, which fails the strict xfail).
KNOWN_BUGS: dict[str, str] = {}

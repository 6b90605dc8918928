"""Which records train and which are held out for evaluation; shared by every kind of data set
(SFT conversations, preference pairs, RL prompts).

- `data.eval` set: the held-out records are read from it (a hub data set at `data.eval_split`,
  by default its `test` split; a local file whole).
- else `data.eval_fraction` f > 0: of the n training records, those at the first
  max(1, round(f n)) places of a permutation seeded by the run's seed are held out; the others
  train, in their original order.
- `data.max_records` then keeps the first records of what trains.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TypeVar

from tunelab.config import DataConfig
from tunelab.data.sources import is_local
from tunelab.errors import DataError

Record = TypeVar("Record")


def eval_split(cfg: DataConfig) -> str:
    """The split `data.eval` is read at: `data.eval_split`, else `test` for a hub id, `train` for a file."""
    return cfg.eval_split or ("test" if not is_local(cfg.eval) else "train")


def eval_source(cfg: DataConfig) -> str:
    """How an error names the held-out records: `data.eval`, else the training file's fraction."""
    return cfg.eval or f"{cfg.train} (data.eval_fraction={cfg.eval_fraction})"


def hold_out(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """(training records, held-out records): a seeded `fraction` of `records` held out (at least one)."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[: max(1, int(round(fraction * len(order))))])
    kept = [r for i, r in enumerate(records) if i not in held]
    return kept, [r for i, r in enumerate(records) if i in held]


def split_train_eval(
    cfg: DataConfig,
    train: list[Record],
    read_eval: Callable[[str, str], tuple[list[Record], int]],
    seed: int,
) -> tuple[list[Record], list[Record] | None, int]:
    """(training records, held-out records or None, held-out records skipped as bad) from the
    checked training records; `read_eval(source, split)` reads and checks `data.eval` the same way
    and returns (records, number skipped)."""
    held_out, skipped = None, 0
    if cfg.eval:
        held_out, skipped = read_eval(cfg.eval, eval_split(cfg))
    elif cfg.eval_fraction > 0:
        total = len(train)
        train, held_out = hold_out(train, cfg.eval_fraction, seed)
        if not train:
            raise DataError(
                cfg.train,
                None,
                None,
                f"data.eval_fraction={cfg.eval_fraction} holds out all {total} usable records: "
                "none is left to train on",
            )
    if cfg.max_records is not None:
        train = train[: cfg.max_records]
    return train, held_out, skipped

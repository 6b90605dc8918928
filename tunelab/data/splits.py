"""Which records train and which are held out for evaluation; shared by every kind of data set
(SFT conversations, preference pairs, RL prompts).

- `data.eval` set: the held-out records are read from it (a hub data set at `data.eval_split`,
  by default its `test` split; a local file whole).
- else `data.eval_fraction` f > 0: of the n training records, those at the first
  max(1, round(f n)) places of a permutation seeded by the run's seed are held out; the others
  train, in their original order.
- `data.max_records` then keeps the first records of what trains.

`tunelab.data.mixture.read_mixture` applies these to each source of a mixture.
"""

from __future__ import annotations

import random
from typing import TypeVar

from tunelab.config import DataConfig
from tunelab.data.sources import is_local

Record = TypeVar("Record")


def eval_split(cfg: DataConfig) -> str:
    """The split `data.eval` is read at: `data.eval_split`, else `test` for a hub id, `train` for a file
    (a source of a list that sets its own `split` is read there)."""
    local = isinstance(cfg.eval, str) and is_local(cfg.eval)
    return cfg.eval_split or ("train" if local else "test")


def describe(spec) -> str:
    """`data.train` / `data.eval` for a message: the path, or the sources' paths joined by `+`."""
    return spec if isinstance(spec, str) else " + ".join(source.path for source in spec)


def eval_source(cfg: DataConfig) -> str:
    """How an error names the held-out records: `data.eval`, else the training file's fraction."""
    if cfg.eval:
        return describe(cfg.eval)
    return f"{describe(cfg.train)} (data.eval_fraction={cfg.eval_fraction})"


def hold_out(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """(training records, held-out records): a seeded `fraction` of `records` held out (at least one)."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[: max(1, int(round(fraction * len(order))))])
    kept = [r for i, r in enumerate(records) if i not in held]
    return kept, [r for i, r in enumerate(records) if i in held]

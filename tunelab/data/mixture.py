"""Several sources mixed into one training set, each with its own format, columns and share.

`data.train` is one path or hub id (a single source read whole, as always), or a list of sources
(`tunelab.config.SourceConfig`). From source i holding n_i usable records, the mixture takes

    c_i = records_i                   when the source sets `records`
    c_i = round(weight_i * n_i)       when it sets `weight`
    c_i = n_i                         when it sets neither

as floor(c_i / n_i) copies of every record plus a sample of c_i mod n_i records drawn without
replacement by `random.Random(f"{seed}:{i}")`, so source i makes up c_i / sum_j c_j of the
mixture. With several sources the mixture is then shuffled by `random.Random(seed)` (so that
`data.max_records` keeps a mix, not the first source). Everything is a pure function of the seed
and the data: the batch order built on it (`tunelab.data.collate`) resumes at the exact next batch.

Held-out records (`data.eval_fraction`) are drawn from each source before it is sampled, so a
record repeated for training is never also held out. `data.eval` may list sources too; they are
mixed the same way.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from tunelab.config import DataConfig, SourceConfig
from tunelab.data.sources import check_records, map_columns, read_source, source_name
from tunelab.data.splits import eval_split, hold_out
from tunelab.errors import DataError

Check = Callable[[dict, str, int], Any]
MakeCheck = Callable[[SourceConfig, str, int, dict], tuple[Check, str]]
"""`make_check(source, name, number, first record)` -> (the check of that source's records, the
format it reads): it may look at the first record (`number` in the part `name`) to resolve `auto`."""


@dataclass
class Mixed:
    """The checked training items (mixed) and held-out items, with what each source contributed."""

    train: list
    eval: list | None
    skipped: int = 0
    """Training records skipped as bad (`data.skip_bad_records`)."""
    eval_skipped: int = 0
    """Held-out records (of `data.eval`) skipped as bad."""
    read: list[int] = field(default_factory=list)
    """Usable training records of each source (after the hold-out)."""
    taken: list[int] = field(default_factory=list)
    """Records the mixture took from each source."""
    formats: list[str] = field(default_factory=list)
    """The resolved format of every training source."""


def as_sources(spec: str | list[SourceConfig], cfg: DataConfig, split: str) -> list[SourceConfig]:
    """`data.train`/`data.eval` as a list of sources, with format and split filled in from `cfg`."""
    if isinstance(spec, str):
        spec = [SourceConfig(path=spec)]
    return [replace(s, format=s.format or cfg.format, split=s.split or split) for s in spec]


def read_checked(
    src: SourceConfig, make_check: MakeCheck, skip_bad: bool, seed: int
) -> tuple[list, int, str]:
    """(checked items of one source, records skipped as bad, the format its check resolved)."""
    parts, skipped = read_source(src, skip_bad, seed)
    items, resolved = [], src.format or "auto"
    for name, records in parts:
        if not records:
            raise DataError(name, None, None, "no usable records")
        first = map_columns(records[0][1], src.columns, name, records[0][0])
        check, resolved = make_check(src, name, records[0][0], first)

        def mapped(record: dict, source: str, number: int, check=check) -> Any:
            return check(map_columns(record, src.columns, source, number), source, number)

        checked, bad = check_records(name, records, skip_bad, mapped)
        items += checked
        skipped += bad
    return items, skipped, resolved


def take_count(src: SourceConfig, available: int) -> int:
    """How many records the mixture takes from a source holding `available` (module docstring)."""
    if src.records is not None:
        return src.records
    if src.weight is not None:
        return max(1, round(src.weight * available))
    return available


def sample(items: list, count: int, seed: int, index: int) -> list:
    """`count` of `items`: whole copies, then a seeded sample of the rest kept in source order."""
    copies, rest = divmod(count, len(items))
    chosen = sorted(random.Random(f"{seed}:{index}").sample(range(len(items)), rest))
    return items * copies + [items[i] for i in chosen]


def mix(per_source: list[list], sources: list[SourceConfig], seed: int) -> tuple[list, list[int]]:
    """The mixture of the sources' items and how many each contributed (module docstring)."""
    taken = [
        sample(items, take_count(src, len(items)), seed, i)
        for i, (items, src) in enumerate(zip(per_source, sources, strict=True))
    ]
    mixture = [item for part in taken for item in part]
    if len(sources) > 1:
        random.Random(seed).shuffle(mixture)
    return mixture, [len(part) for part in taken]


def read_mixture(cfg: DataConfig, make_check: MakeCheck, seed: int) -> Mixed:
    """Read and check every training (and eval) source, hold out, and mix, in the order of the
    module docstring (sources, hold-out, mixture, `max_records`)."""
    if not cfg.train:
        raise DataError("data.train", None, None, "no training data given")
    sources = as_sources(cfg.train, cfg, cfg.split)
    per_source, skipped, formats, held = [], 0, [], []
    for src in sources:
        items, bad, resolved = read_checked(src, make_check, cfg.skip_bad_records, seed)
        skipped += bad
        formats.append(resolved)
        if not cfg.eval and cfg.eval_fraction > 0:
            total = len(items)
            items, held_part = hold_out(items, cfg.eval_fraction, seed)
            held += held_part
            if not items:
                raise DataError(
                    source_name(src),
                    None,
                    None,
                    f"data.eval_fraction={cfg.eval_fraction} holds out all {total} usable records: "
                    "none is left to train on",
                )
        per_source.append(items)
    train, counts = mix(per_source, sources, seed)
    if cfg.max_records is not None:
        train = train[: cfg.max_records]
    read = [len(items) for items in per_source]
    held_out = held or None
    if cfg.eval:
        eval_sources = as_sources(cfg.eval, cfg, eval_split(cfg))
        eval_parts, eval_skipped = [], 0
        for src in eval_sources:
            items, bad, _ = read_checked(src, make_check, cfg.skip_bad_records, seed)
            eval_parts.append(items)
            eval_skipped += bad
        held_out, _ = mix(eval_parts, eval_sources, seed)
        return Mixed(train, held_out, skipped, eval_skipped, read, counts, formats)
    return Mixed(train, held_out, skipped, 0, read, counts, formats)


def source_lines(sources: list[SourceConfig], read: list[int], taken: list[int]) -> list[str]:
    """The data report's line per source of a mixture (none for a single source): its name, the
    records read and the records taken, with their share of the mixture."""
    if len(sources) < 2:
        return []
    total = max(1, sum(taken))
    return [
        f"source {i} {source_name(src)}: {n} records, {count} taken ({100 * count / total:.1f}%)"
        for i, (src, n, count) in enumerate(zip(sources, read, taken, strict=True), start=1)
    ]

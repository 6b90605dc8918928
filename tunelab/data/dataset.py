"""From a `DataConfig` to tokenised training and evaluation examples.

Steps: read every source -> check each record and turn it into a `Conversation` (errors name the
file, the record and the field; with `skip_bad_records` they are counted instead) -> hold out and
mix (`tunelab.data.mixture`) -> render with the template -> tokenise (all cores) into flat arrays.
All checking happens here, before any training starts. With `data.cache_dir` the arrays are the
token cache's memory-mapped files (`tunelab.data.cache`): a later run with the same sources,
tokenizer, template and options reads them and tokenises nothing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from tunelab.config import DataConfig, SourceConfig
from tunelab.data.cache import CACHE_VERSION, SplitWriter, cache_folder, cache_key, read_split
from tunelab.data.formats import Conversation, detect_format, to_conversation
from tunelab.data.mixture import Mixed, as_sources, read_mixture, source_lines
from tunelab.data.splits import describe, eval_source
from tunelab.data.templates import choose_template, generation_prompt, override_chat_template
from tunelab.data.tokenize import TokenizedExample, adds_bos, encode_in_parallel, encode_prompt
from tunelab.disk_cache import locked, new_entry, publish, read_meta
from tunelab.errors import DataError


@dataclass
class SplitData:
    """Tokenised examples of one split plus what is needed to evaluate by generation."""

    examples: Sequence[TokenizedExample]
    """The examples (`TokenArrays`: read lazily from flat, possibly memory-mapped, arrays)."""
    conversations: Sequence[Conversation]
    skipped: int = 0
    truncated: int = 0
    empty: int = 0
    """Examples dropped because no target token survived truncation."""


@dataclass
class PreparedData:
    train: SplitData
    eval: SplitData | None
    format: str
    template: str
    notes: list[str] = field(default_factory=list)
    tokenized: int = 0
    """Conversations tokenised by this call (0 when the token cache held them all)."""
    cache: Path | None = None
    """The token cache's entry these data were read from (None: tokenised in memory)."""


def conversation_checks(system_prompt: str | None):
    """The `MakeCheck` of SFT data: each source's records become `Conversation`s of its format
    (`auto`: detected from the source's first record)."""

    def make_check(src: SourceConfig, name: str, number: int, first: dict):
        fmt = src.format or "auto"
        if fmt == "auto":
            fmt = detect_format(first)
            if fmt == "unknown":
                problem = f"cannot tell the data format from fields {sorted(first)}; set data.format"
                raise DataError(name, number, None, problem)

        def check(record: dict, source: str, number: int) -> Conversation:
            return to_conversation(record, fmt, source, number, system_prompt)

        return check, fmt

    return make_check


def default_workers() -> int:
    """Processes that tokenise: every core this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def prepare_data(
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    seed: int = 0,
    role: str = "training",
    workers: int | None = None,
) -> PreparedData:
    """Read, check, split and tokenise the training (and evaluation) data of a run, through the
    token cache when `data.cache_dir` is set. `role` names the examples of `cfg.train` in the notes
    and errors (`tunelab eval` reads its data as `eval`); `workers` processes tokenise (default:
    every core). `data.chat_template` becomes the tokenizer's chat template here."""
    if not cfg.train:
        raise DataError("data.train", None, None, "no training data given")
    override_chat_template(cfg.chat_template, tokenizer)
    workers = workers or default_workers()
    folder = cache_folder(cfg)
    if folder is None:
        meta, splits = _build(cfg, tokenizer, seed, role, None, workers)
        return _prepared(cfg, meta, splits, meta["conversations"])
    key = cache_key(cfg, tokenizer, seed, role)
    with locked(folder, key, "data.cache_dir", "token cache", "set data.cache_dir: null") as entry:
        meta, tokenized = read_meta(entry, CACHE_VERSION), 0
        if meta is None:
            building = new_entry(entry)
            try:
                meta, _ = _build(cfg, tokenizer, seed, role, building, workers)
                publish(building, entry, meta)
            finally:
                shutil.rmtree(building, ignore_errors=True)
            tokenized = meta["conversations"]
    splits = {name: read_split(entry, name) for name in meta["splits"]}
    data = _prepared(cfg, meta, splits, tokenized)
    data.cache = entry
    return data


def _prepared(cfg: DataConfig, meta: dict, splits: dict, tokenized: int) -> PreparedData:
    """`PreparedData` from an entry's `meta` and its splits' (examples, conversations); the report
    names the sources as `cfg` does (an entry is keyed by contents, not by paths)."""
    made = {
        name: SplitData(
            *splits[name], **{k: meta["splits"][name][k] for k in ("skipped", "truncated", "empty")}
        )
        for name in meta["splits"]
    }
    sources = as_sources(cfg.train, cfg, cfg.split)
    notes = source_lines(sources, meta["sources"]["read"], meta["sources"]["taken"]) + meta["notes"]
    return PreparedData(made["train"], made.get("eval"), meta["format"], meta["template"], notes, tokenized)


def _build(
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    role: str,
    folder: Path | None,
    workers: int,
) -> tuple[dict, dict]:
    """Read, check, mix and tokenise: (the entry's meta, {split: (examples, conversations)} when
    `folder` is None, else written there). Every error is raised before anything is kept."""
    mixed = read_mixture(cfg, conversation_checks(cfg.system_prompt), seed)
    fmt = "+".join(sorted(set(mixed.formats)))
    template = choose_template(cfg.template, tokenizer) if fmt != "text" else "text"
    splits, counts = {}, {}
    parts = [("train", mixed.train, mixed.skipped)]
    if mixed.eval:
        parts.append(("eval", mixed.eval, mixed.eval_skipped))
    for name, conversations, skipped in parts:
        writer = SplitWriter(folder, name)
        truncated = empty = 0
        encoded_chunks = encode_in_parallel(
            conversations,
            tokenizer,
            template,
            cfg.max_length,
            cfg.train_on_prompt,
            workers,
            f"tokenising {name}",
        )
        for encoded in encoded_chunks:
            writer.add(encoded, conversations)
            truncated, empty = truncated + encoded.truncated, empty + encoded.empty
        made = writer.finish()
        if made is not None:
            splits[name] = made
        counts[name] = {
            "examples": writer.examples,
            "records": len(conversations),
            "skipped": skipped,
            "truncated": truncated,
            "empty": empty,
        }
    notes = _notes(cfg, mixed, counts, role)
    meta = {
        "version": CACHE_VERSION,
        "format": fmt,
        "template": template,
        "notes": notes,
        "splits": counts,
        "conversations": sum(c["records"] for c in counts.values()),
        "sources": {"read": mixed.read, "taken": mixed.taken},
    }
    return meta, splits


def _notes(cfg: DataConfig, mixed: Mixed, counts: dict, role: str) -> list[str]:
    """The data report's lines (sources, skipped, truncated, dropped), after the checks that the
    training and eval sets are not empty."""
    notes = []
    skipped = sum(c["skipped"] for c in counts.values())
    if skipped:
        notes.append(f"skipped {skipped} bad records")
    for name, split in counts.items():
        label = role if name == "train" else "eval"
        if split["truncated"]:
            notes.append(
                f"truncated {split['truncated']} of {split['records']} {label} examples to {cfg.max_length} tokens"
            )
        if split["empty"]:
            notes.append(
                f"dropped {split['empty']} {label} examples with no response tokens left after truncation"
            )
    if not counts["train"]["examples"]:
        raise DataError(
            describe(cfg.train),
            None,
            None,
            f"no {role} example has response tokens within max_length={cfg.max_length}",
        )
    if "eval" in counts and not counts["eval"]["examples"]:
        raise DataError(
            eval_source(cfg),
            None,
            None,
            f"no eval example has response tokens within max_length={cfg.max_length}: the eval set is empty",
        )
    return notes


def prompt_and_reference(
    conv: Conversation, tokenizer: PreTrainedTokenizerBase, template: str
) -> tuple[list[int], str]:
    """Token ids of the generation prompt for `conv` and the reference response."""
    text, reference = generation_prompt(conv, tokenizer, template)
    return encode_prompt(
        text, tokenizer, add_special_tokens=template != "chat" and adds_bos(tokenizer)
    ), reference

"""The token cache: tokenised data kept on disk, memory-mapped, and reused by later runs and ranks.

An entry is the folder `data.cache_dir/KEY/`, KEY a SHA-256 of everything that changes the tokens:

- the contents of every source (`tunelab.data.sources.fingerprint`: the bytes of local files, the
  fingerprint `datasets` gives a data set, a stream's description) and its other settings (subset,
  split, columns, weight, ...), but not its path: moved or renamed files keep their entry;
- the tokenizer (its serialised vocabulary, merges, normaliser and post-processor, special tokens
  and chat template, after `data.chat_template` is applied);
- every `data` option except those that only batch or place the data (`PLACEMENT_OPTIONS`), the
  seed (hold-out and mixture sampling) and `CACHE_VERSION`.

Per split (`train`, `eval`) it holds flat arrays, read with `numpy.memmap` so that a run's memory
does not grow with the data set:

    SPLIT.ids          int32 (N,)    every example's tokens, one after the other
    SPLIT.targets      bool  (N,)    the token carries loss
    SPLIT.offsets      int64 (E+1,)  example i = ids[offsets[i]:offsets[i+1]]
    SPLIT.conversations      UTF-8 JSON lines, the checked conversations (for generation-based eval)
    SPLIT.conv_offsets int64 (C+1,)  byte offsets of those lines

and `meta.json` (counts, notes, format, template). One process builds an entry while the others
wait on its lock (`tunelab.disk_cache`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from tunelab.config import DataConfig, to_plain
from tunelab.data.formats import Conversation
from tunelab.data.mixture import as_sources
from tunelab.data.sources import fingerprint
from tunelab.data.splits import eval_split
from tunelab.data.tokenize import Encoded, OffsetSequence, TokenArrays

CACHE_VERSION = 1
"""Bumped whenever what an entry holds, or how tokens are made, changes."""

PLACEMENT_OPTIONS = ("cache_dir", "packing", "native_attention", "group_by_length")
"""`data` options that do not change the tokens (they batch or place them): not in the key."""

ARRAYS = {"ids": np.int32, "targets": np.bool_, "offsets": np.int64, "conv_offsets": np.int64}


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of what decides the tokenizer's output: its serialised state (vocabulary, merges,
    normaliser, pre-tokenizer, post-processor, added tokens) or, for a slow tokenizer, its
    vocabulary and settings; its special tokens and its chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = backend.to_str()
    else:
        state = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.init_kwargs], default=str)
    parts = [
        type(tokenizer).__name__,
        state,
        str(tokenizer.chat_template),
        json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str),
        str(getattr(tokenizer, "add_bos_token", None)),
        str(getattr(tokenizer, "add_eos_token", None)),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def cache_key(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int, role: str) -> str:
    """The entry's name (module docstring): a hash of the sources, the tokenizer and the options."""
    options = {k: v for k, v in to_plain(cfg).items() if k not in PLACEMENT_OPTIONS + ("train", "eval")}
    train = as_sources(cfg.train, cfg, cfg.split)
    held_out = as_sources(cfg.eval, cfg, eval_split(cfg)) if cfg.eval else []
    described = [
        [
            {**{k: v for k, v in to_plain(source).items() if k != "path"}, "contents": fingerprint(source)}
            for source in part
        ]
        for part in (train, held_out)
    ]
    digest = hashlib.sha256()
    digest.update(
        json.dumps([CACHE_VERSION, options, described, seed, role], sort_keys=True, default=str).encode()
    )
    digest.update(tokenizer_fingerprint(tokenizer).encode())
    return digest.hexdigest()[:32]


def cache_folder(cfg: DataConfig) -> Path | None:
    """`data.cache_dir` as a path (`~` expanded), or None when the cache is off."""
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else None


class SplitWriter:
    """Appends the `Encoded` chunks of one split and their conversations: to files of an entry
    being built, or (`folder` None) to arrays in memory."""

    def __init__(self, folder: Path | None, split: str):
        self.folder, self.split = folder, split
        self.examples = 0
        self.tokens = 0
        self.offsets = [np.zeros(1, dtype=np.int64)]
        self.conv_offsets = [0]
        self.in_memory: dict[str, list] = {"ids": [], "targets": [], "conversations": []}
        self.files = {}
        if folder is not None:
            for name in ("ids", "targets", "offsets", "conversations", "conv_offsets"):
                self.files[name] = open(folder / f"{split}.{name}", "wb")  # noqa: SIM115 - closed in finish
            self.files["offsets"].write(np.zeros(1, dtype=np.int64).tobytes())  # offsets[0] = 0

    def add(self, encoded: Encoded, conversations: Sequence[Conversation]) -> None:
        """Append a chunk and the conversations it kept (`conversations[i]` for i in `encoded.kept`)."""
        offsets = self.tokens + np.cumsum(encoded.lengths)
        self.tokens += int(encoded.lengths.sum())
        self.examples += len(encoded.lengths)
        kept = [conversations[i] for i in encoded.kept]
        if self.folder is None:
            self.in_memory["ids"].append(encoded.ids)
            self.in_memory["targets"].append(encoded.targets)
            self.offsets.append(offsets)
            self.in_memory["conversations"] += kept
            return
        self.files["ids"].write(encoded.ids.astype(np.int32).tobytes())
        self.files["targets"].write(encoded.targets.astype(np.bool_).tobytes())
        self.files["offsets"].write(np.asarray(offsets, dtype=np.int64).tobytes())
        for conv in kept:
            line = json.dumps({"turns": conv.turns, "extra": conv.extra}, default=str).encode() + b"\n"
            self.files["conversations"].write(line)
            self.conv_offsets.append(self.conv_offsets[-1] + len(line))

    def finish(self) -> tuple[TokenArrays, Sequence[Conversation]] | None:
        """In memory: the examples and conversations. On disk: close the files (None)."""
        if self.folder is None:
            ids = np.concatenate(self.in_memory["ids"] or [np.zeros(0, np.int32)])
            targets = np.concatenate(self.in_memory["targets"] or [np.zeros(0, np.bool_)])
            return TokenArrays(ids, targets, np.concatenate(self.offsets)), self.in_memory["conversations"]
        self.files["conv_offsets"].write(np.asarray(self.conv_offsets, dtype=np.int64).tobytes())
        for handle in self.files.values():
            handle.close()
        return None


class StoredConversations(OffsetSequence):
    """The conversations of a split, read one JSON line at a time from the entry (byte offsets)."""

    def __init__(self, path: Path, offsets: np.ndarray):
        super().__init__(offsets)
        self.path = path

    def item(self, start: int, stop: int) -> Conversation:
        with open(self.path, "rb") as handle:
            handle.seek(start)
            data = json.loads(handle.read(stop - start))
        return Conversation([tuple(turn) for turn in data["turns"]], data["extra"])


def _memmap(path: Path, dtype) -> np.ndarray:
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def read_split(entry: Path, split: str) -> tuple[TokenArrays, StoredConversations]:
    """The examples and conversations of a split of a finished entry, memory-mapped."""
    arrays = {name: _memmap(entry / f"{split}.{name}", dtype) for name, dtype in ARRAYS.items()}
    examples = TokenArrays(arrays["ids"], arrays["targets"], arrays["offsets"])
    return examples, StoredConversations(entry / f"{split}.conversations", arrays["conv_offsets"])

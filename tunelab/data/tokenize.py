"""Tokenising rendered segments into `input_ids` and `labels` (-100 where no loss is taken).

    input_ids = concat(tokens(segment_1), ..., tokens(segment_n))        # (T,)
    labels[t] = input_ids[t] if token t belongs to a target segment else -100

The model's loss at position t predicts token t from tokens < t (the shift happens in the loss).
Examples longer than `max_length` are cut at `max_length` tokens; the count is reported.

Many conversations are tokenised by forked worker processes, chunk by chunk in order
(`encode_in_parallel`), into flat arrays (`Encoded`) that the token cache stores and `TokenArrays`
reads back example by example.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedTokenizerBase

from tunelab.console import progress
from tunelab.data.formats import Conversation
from tunelab.data.templates import Segment, render_examples

IGNORE_INDEX = -100


@dataclass
class TokenizedExample:
    """One training example."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def num_targets(self) -> int:
        """Positions that carry loss (a label that is not -100, excluding the first token)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Does `tokenizer(text)` put a BOS token in front by itself?"""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return tokenizer.bos_token_id is not None and len(ids) > 0 and ids[0] == tokenizer.bos_token_id


def encode_segments(
    segments: list[Segment],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    train_on_prompt: bool = False,
    add_special_tokens: bool = True,
) -> TokenizedExample:
    """Tokenise each segment on its own and concatenate (see module docstring)."""
    pieces = [
        (tokenizer(text, add_special_tokens=add_special_tokens and index == 0)["input_ids"], is_target)
        for index, (text, is_target) in enumerate(segments)
    ]
    return assemble(pieces, max_length, train_on_prompt)


def assemble(
    pieces: list[tuple[list[int], bool]], max_length: int, train_on_prompt: bool
) -> TokenizedExample:
    """The example of tokenised segments (ids, is_target): concatenated, cut at `max_length`."""
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, is_target in pieces:
        input_ids += ids
        labels += ids if (is_target or train_on_prompt) else [IGNORE_INDEX] * len(ids)
    truncated = len(input_ids) > max_length
    return TokenizedExample(input_ids[:max_length], labels[:max_length], truncated)


def encode_prompt(text: str, tokenizer: PreTrainedTokenizerBase, add_special_tokens: bool) -> list[int]:
    """Token ids of a generation prompt, tokenised exactly as the prompt part of a training example."""
    return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]


# ------------------------------------------------------------------ many examples, as flat arrays


@dataclass
class Encoded:
    """The examples of some conversations as flat arrays (what the token cache stores).

    ids: (N,) int32, every example's tokens one after the other; targets: (N,) bool, the token
    carries loss; lengths: (E,) tokens per example; kept: indices of the conversations that gave
    at least one example; truncated / empty: examples cut at `max_length` / dropped without a
    target token."""

    ids: np.ndarray
    targets: np.ndarray
    lengths: np.ndarray
    kept: list[int]
    truncated: int = 0
    empty: int = 0


def encode_conversations(
    conversations: Sequence[Conversation],
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    max_length: int,
    train_on_prompt: bool,
    add_special_tokens: bool,
) -> Encoded:
    """Render (`render_examples`) and tokenise conversations, as `encode_segments` does one by one
    but with two batched tokenizer calls (first segments, the others); examples left without a
    target token after truncation are dropped and counted."""
    rendered = [
        (index, segments)
        for index, conv in enumerate(conversations)
        for segments in render_examples(conv, tokenizer, template)
    ]
    firsts = [segments[0][0] for _, segments in rendered]
    rests = [text for _, segments in rendered for text, _ in segments[1:]]
    first_ids = tokenizer(firsts, add_special_tokens=add_special_tokens)["input_ids"] if firsts else []
    rest_ids = iter(tokenizer(rests, add_special_tokens=False)["input_ids"] if rests else [])
    ids, targets, lengths, kept, truncated, empty = [], [], [], [], 0, 0
    for (index, segments), first in zip(rendered, first_ids, strict=True):
        pieces = [(first, segments[0][1])] + [(next(rest_ids), is_target) for _, is_target in segments[1:]]
        example = assemble(pieces, max_length, train_on_prompt)
        truncated += example.truncated
        if example.num_targets == 0:
            empty += 1
            continue
        if not kept or kept[-1] != index:
            kept.append(index)
        ids += example.input_ids
        targets += [label != IGNORE_INDEX for label in example.labels]
        lengths.append(len(example.input_ids))
    return Encoded(
        np.asarray(ids, dtype=np.int32),
        np.asarray(targets, dtype=bool),
        np.asarray(lengths, dtype=np.int64),
        kept,
        truncated,
        empty,
    )


_JOB: tuple | None = None
"""What the worker processes tokenise: set by `encode_in_parallel` before they fork."""

CHUNK = 512
"""Conversations per unit of work of the tokenising processes."""


def _encode_range(bounds: tuple[int, int]) -> Encoded:
    conversations, *rest = _JOB
    start, stop = bounds
    encoded = encode_conversations(conversations[start:stop], *rest)
    encoded.kept = [start + i for i in encoded.kept]
    return encoded


def encode_in_parallel(
    conversations: Sequence[Conversation],
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    max_length: int,
    train_on_prompt: bool,
    workers: int,
    desc: str = "tokenising",
) -> Iterator[Encoded]:
    """`encode_conversations` over chunks of `CHUNK` conversations, in order, by `workers` forked
    processes (in this process when 1, or for fewer than two chunks), with a progress bar."""
    global _JOB
    add_special = template != "chat" and adds_bos(tokenizer)
    _JOB = (conversations, tokenizer, template, max_length, train_on_prompt, add_special)
    bounds = [(i, min(i + CHUNK, len(conversations))) for i in range(0, len(conversations), CHUNK)]
    bar = progress(len(conversations), desc, enabled=len(bounds) > 1)
    try:
        if workers <= 1 or len(bounds) < 2 or "fork" not in mp.get_all_start_methods():
            results = map(_encode_range, bounds)
            pool = None
        else:
            pool = mp.get_context("fork").Pool(min(workers, len(bounds)))
            results = pool.imap(_encode_range, bounds)
        try:
            for (start, stop), encoded in zip(bounds, results, strict=True):
                bar.update(stop - start)
                yield encoded
        finally:
            if pool is not None:
                pool.terminate()
    finally:
        bar.close()
        _JOB = None


class OffsetSequence(Sequence):
    """A read-only sequence whose item i spans [offsets[i], offsets[i+1]) of some flat storage;
    a subclass reads that span (`item`). Indexing as for a list: negative indices, slices."""

    def __init__(self, offsets: np.ndarray):
        self.offsets = offsets  # (E + 1,)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.item(int(self.offsets[index]), int(self.offsets[index + 1]))

    def item(self, start: int, stop: int):
        raise NotImplementedError


class TokenArrays(OffsetSequence):
    """Examples read lazily from flat arrays (numpy memmaps of the token cache, or arrays in memory):
    example i is ids[offsets[i]:offsets[i+1]], its labels the ids where `targets`, else -100. Only
    the examples asked for become Python lists, so memory does not grow with the data set."""

    def __init__(self, ids: np.ndarray, targets: np.ndarray, offsets: np.ndarray):
        super().__init__(offsets)
        self.ids, self.targets = ids, targets

    @property
    def lengths(self) -> np.ndarray:
        """(E,) tokens per example."""
        return np.diff(self.offsets)

    def item(self, start: int, stop: int) -> TokenizedExample:
        ids = np.asarray(self.ids[start:stop], dtype=np.int64)  # (T,)
        labels = np.where(self.targets[start:stop], ids, IGNORE_INDEX)  # (T,)
        return TokenizedExample(ids.tolist(), labels.tolist())

"""Tokenising rendered segments into `input_ids` and `labels` (-100 where no loss is taken).

    input_ids = concat(tokens(segment_1), ..., tokens(segment_n))        # (T,)
    labels[t] = input_ids[t] if token t belongs to a target segment else -100

The model's loss at position t predicts token t from tokens < t (the shift happens in the loss).
Examples longer than `max_length` are cut at `max_length` tokens; the count is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from tunelab.data.templates import Segment

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
    input_ids: list[int] = []
    labels: list[int] = []
    for index, (text, is_target) in enumerate(segments):
        ids = tokenizer(text, add_special_tokens=add_special_tokens and index == 0)["input_ids"]
        input_ids += ids
        labels += ids if (is_target or train_on_prompt) else [IGNORE_INDEX] * len(ids)
    truncated = len(input_ids) > max_length
    return TokenizedExample(input_ids[:max_length], labels[:max_length], truncated)


def encode_prompt(text: str, tokenizer: PreTrainedTokenizerBase, add_special_tokens: bool) -> list[int]:
    """Token ids of a generation prompt, tokenised exactly as the prompt part of a training example."""
    return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

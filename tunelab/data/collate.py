"""Batching: seeded, resumable order of examples, and padding into tensors.

The order of micro-batches is a pure function of (seed, epoch), so a resumed run can jump straight
to micro-batch k without replaying the data. With `group_by_length`, examples are sorted by length
inside windows of 64 batches before batching, and the batches are then shuffled: far less padding,
still a different order each epoch.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch

from tunelab.data.tokenize import IGNORE_INDEX, TokenizedExample


def epoch_batches(
    lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool = False
) -> list[list[int]]:
    """Index lists of the micro-batches of one epoch (the last, smaller batch is kept)."""
    order = list(range(len(lengths)))
    rng = random.Random(seed * 1_000_003 + epoch)
    rng.shuffle(order)
    if group_by_length:
        window = batch_size * 64
        order = [
            i
            for start in range(0, len(order), window)
            for i in sorted(order[start : start + window], key=lambda i: lengths[i], reverse=True)
        ]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length:
        rng.shuffle(batches)
    return batches


def example_lengths(examples) -> list[int]:
    """Tokens per example: read from the flat arrays of `TokenArrays` (no example is built), else
    counted one by one."""
    lengths = getattr(examples, "lengths", None)
    return lengths.tolist() if lengths is not None else [len(e.input_ids) for e in examples]


def batch_stream(
    lengths: list[int], batch_size: int, seed: int, start: int = 0, group_by_length: bool = False
) -> Iterator[list[int]]:
    """Endless micro-batches over epochs, starting at global micro-batch index `start`."""
    per_epoch = -(-len(lengths) // batch_size)
    epoch, offset = divmod(start, per_epoch)
    while True:
        batches = epoch_batches(lengths, batch_size, seed, epoch, group_by_length)
        yield from batches[offset:]
        epoch, offset = epoch + 1, 0


def token_slots(lengths: list[int], packed: bool) -> int:
    """Token slots one forward pass over examples of `lengths` holds: sum_i T_i in one packed row,
    B x max_i T_i padded."""
    return sum(lengths) if packed else len(lengths) * max(lengths)


def split_by_tokens(
    lengths: list[int], budget: int, packed: bool, parts: int | None = None
) -> list[list[int]] | None:
    """Positions 0..B-1 of a micro-batch's examples (of `lengths`) in consecutive groups, each within
    `budget` token slots (`token_slots`; every T_i <= budget). Greedy: a group grows until the next
    example would overflow it, giving the fewest groups for this order. With `parts`, exactly that
    many groups: the group of most examples is halved until there are (any part of a group fits
    too); None when the examples are too few for `parts` non-empty groups."""
    groups: list[list[int]] = []
    for position, length in enumerate(lengths):
        current = groups[-1] if groups else None
        if current is None or token_slots([lengths[j] for j in current] + [length], packed) > budget:
            groups.append([position])
        else:
            current.append(position)
    while parts is not None and len(groups) < parts:
        largest = max(range(len(groups)), key=lambda g: len(groups[g]))
        group = groups[largest]
        if len(group) < 2:
            return None
        groups[largest : largest + 1] = [group[: len(group) // 2], group[len(group) // 2 :]]
    return groups


def pad_batch(examples: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask, labels, each (B, T)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def count_targets(labels: torch.Tensor) -> int:
    """Positions with loss after the causal shift: labels[:, 1:] != -100."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def left_pad(prompts: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompts for generation: input_ids and attention_mask, each (B, T)."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)  # (B, T)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def to_device(batch: dict, device: torch.device) -> dict:
    """Move the tensors of a padded or packed batch to `device` (integers stay as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

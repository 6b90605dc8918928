"""What the pairwise objectives (reward, DPO) share: batches of preference pairs.

A batch of P pairs is padded into 2P rows, the chosen responses first (`pad_pairs`); its unit of
loss normalisation is the pair. Training batches follow the seeded, resumable order of
`batch_stream` over global batches of `train.batch_size x processes` pairs, of which each process
takes its rows (`Parallel.shard`); held-out batches are taken in file order.
"""

from __future__ import annotations

from collections.abc import Iterator

from tunelab.data.collate import batch_stream, to_device
from tunelab.data.preference import PairExample, pad_pairs
from tunelab.training.setup import Run


def pair_batches(run: Run, pairs: list[PairExample], pad_id: int, position: int) -> Iterator[dict]:
    """This process's padded pair batches of the training order, from micro-batch `position` on."""
    cfg = run.config
    lengths = [p.length for p in pairs]
    for indices in batch_stream(
        lengths, run.global_batch, cfg.train.seed, position, cfg.data.group_by_length
    ):
        yield to_device(pad_pairs([pairs[i] for i in run.dist.shard(indices)], pad_id), run.device)


def held_out_pair_batches(run: Run, pairs: list[PairExample], pad_id: int) -> Iterator[dict]:
    """Padded batches of `train.batch_size` held-out pairs, at most `train.eval_batches` of them."""
    size = run.config.train.batch_size
    for start in list(range(0, len(pairs), size))[: run.config.train.eval_batches]:
        yield to_device(pad_pairs(pairs[start : start + size], pad_id), run.device)


def pair_count(batch: dict) -> int:
    """Pairs in a batch: the loss normalisation unit."""
    return len(batch["margin"])


def real_tokens(batch: dict) -> int:
    """Non-padding tokens of a batch's chosen and rejected rows."""
    return int(batch["attention_mask"].sum())

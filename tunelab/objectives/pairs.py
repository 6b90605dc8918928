"""What the pairwise objectives (reward, DPO) share: batches of preference pairs.

A batch of P pairs is padded into 2P rows, the chosen responses first (`pad_pairs`); its unit of
loss normalisation is the pair. Training batches follow the seeded, resumable order of
`batch_stream` over global batches of `train.batch_size x processes` pairs, of which each process
takes its rows (`Parallel.shard`); held-out batches are taken in file order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from transformers import PreTrainedTokenizerBase

from tunelab.config import RunConfig
from tunelab.data.collate import batch_stream, to_device
from tunelab.data.preference import PairExample, PreferenceData, pad_pairs, prepare_preferences
from tunelab.training.loop import MicroBatch
from tunelab.training.setup import Run, report_data


def read_pairs(config: RunConfig, tokenizer: PreTrainedTokenizerBase) -> PreferenceData:
    """Read, check and tokenise the run's preference pairs (`data.*`), before the model loads."""
    return prepare_preferences(config.data, tokenizer, seed=config.train.seed)


def report_pairs(run: Run, data: PreferenceData) -> None:
    """Say what the run reads (and that `data.packing` does not apply: pairs are padded)."""
    eval_count = len(data.eval) if data.eval else 0
    report_data(run, len(data.train), eval_count, "pairs", f"template {data.template}", data.notes)
    if run.config.data.packing:
        objective = run.config.objective.name
        run.print(f"[tunelab] data.packing: true is ignored by objective {objective}; pairs are padded")


def pair_batches(run: Run, pairs: list[PairExample], position: int) -> Iterator[MicroBatch]:
    """This process's padded pair batches of the training order, from micro-batch `position` on;
    units = pairs, tokens = the non-padding tokens of the chosen and rejected rows."""
    cfg = run.config
    lengths = [p.length for p in pairs]
    order = batch_stream(lengths, run.global_batch, cfg.train.seed, position, cfg.data.group_by_length)
    for indices in order:
        mine = run.dist.shard(indices)
        batch = pad_pairs([pairs[i] for i in mine], run.tokenizer.pad_token_id)
        tokens = int(batch["attention_mask"].sum())
        yield MicroBatch(to_device(batch, run.device), len(batch["margin"]), tokens, mine)


def held_out_pair_batches(run: Run, pairs: list[PairExample]) -> Iterator[dict]:
    """Padded batches of `train.batch_size` held-out pairs, at most `train.eval_batches` of them."""
    size = run.config.train.batch_size
    for start in list(range(0, len(pairs), size))[: run.config.train.eval_batches]:
        yield to_device(pad_pairs(pairs[start : start + size], run.tokenizer.pad_token_id), run.device)


def held_out_pair_figures(run: Run, pairs: list[PairExample], figures_of: Callable[[dict], dict]) -> dict:
    """Mean over the held-out pairs of the per-pair figures `figures_of(batch)` returns (name -> (P,)
    tensor), each named `eval_NAME`; computed in eval mode under the run's autocast, without gradients."""
    model = run.model
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    count = 0
    with torch.no_grad():
        for batch in held_out_pair_batches(run, pairs):
            with run.autocast():
                figures = figures_of(batch)
            for name, values in figures.items():
                sums[name] = sums.get(name, 0.0) + float(values.float().sum())
            count += len(batch["margin"])
    model.train(was_training)
    return {f"eval_{name}": value / max(count, 1) for name, value in sums.items()}

"""`tunelab.training.distributed` without launching processes: the single process is untouched,
and the rows each rank takes rebuild the global batches of one process."""

from __future__ import annotations

import pytest
import torch

from tunelab.config import load_config
from tunelab.data.collate import batch_stream
from tunelab.errors import ConfigError
from tunelab.training import distributed
from tunelab.training.distributed import Parallel


def test_single_process_is_the_identity(monkeypatch, llama_dir):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = load_config(None, ["train.strategy=fsdp"], model={"name_or_path": str(llama_dir)})
    single = distributed.init(config)
    assert single == Parallel() and single.is_main and not single.sharded
    model = torch.nn.Linear(2, 2)
    single.wrap(model)
    assert type(model) is torch.nn.Linear and single.ddp is None and not single.wrapped
    assert single.shard([5, 3, 9]) == [5, 3, 9]
    assert single.sum(3, 2.5) == [3, 2.5]
    assert single.forward(lambda a, b: a + b, 1, 2) == 3
    twin = single.frozen_copy(model)
    assert not any(p.requires_grad for p in twin.parameters()) and torch.equal(twin.weight, model.weight)
    assert set(single.full_state_dict(model)) == {"weight", "bias"}
    tensor = torch.ones(3)
    assert distributed.full_tensor(tensor) is tensor and distributed.shard_like(tensor, tensor) is tensor


@pytest.mark.parametrize("world", [2, 3])
def test_rank_rows_rebuild_the_global_batches(world):
    """Rank r takes rows r::world of every global batch of world x b examples: together the ranks
    see exactly the batches of one process with batch world x b, in the same order. (50 examples:
    the last batch of an epoch holds 2, fewer than 3 ranks: the third rank repeats a row.)"""
    lengths, b = list(range(50)), 4
    single = batch_stream(lengths, b * world, seed=3, start=5)
    ranks = [Parallel(rank=r, world_size=world, strategy="ddp") for r in range(world)]
    for _ in range(12):  # crosses an epoch boundary and its smaller last batch
        indices = next(single)
        rows = [i for p in ranks for i in p.shard(indices)]
        assert all(len(p.shard(indices)) <= b for p in ranks)
        if len(indices) >= world:
            assert sorted(rows) == sorted(indices)
        else:
            assert set(rows) == set(indices) and len(rows) == world


def test_a_rank_without_rows_repeats_one():
    ranks = [Parallel(rank=r, world_size=4, strategy="ddp") for r in range(4)]
    assert [p.shard([7, 8]) for p in ranks] == [[7], [8], [7], [8]]


def test_strategy_is_a_checked_config_field(llama_dir):
    base = {"model": {"name_or_path": str(llama_dir)}, "data": {"train": "x.jsonl"}}
    assert load_config(None, ["train.strategy=fsdp"], **base).train.strategy == "fsdp"
    assert load_config(None, [], **base).train.strategy == "auto"
    with pytest.raises(ConfigError, match="train.strategy"):
        load_config(None, ["train.strategy=zero3"], **base)

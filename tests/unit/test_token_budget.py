"""`train.max_micro_batch_tokens`: a micro-batch that would hold more token slots than the budget is
split into consecutive sub-batches within one optimizer step. The step is the same: the loss is
normalised by the target tokens of the whole step, so a run with a budget gives the losses of a
run without one (float32, up to summation order), and every forward pass stays within the budget.
Counts only, nothing timed."""

from __future__ import annotations

import pytest

import tunelab
from tests.helpers import sft_config
from tunelab.config import load_config
from tunelab.data.collate import split_by_tokens, token_slots
from tunelab.errors import ConfigError
from tunelab.objectives import sft
from tunelab.training.metrics import read_metrics


def test_token_slots_and_the_greedy_split():
    assert token_slots([5, 9, 3], packed=True) == 17 and token_slots([5, 9, 3], packed=False) == 27
    # packed: 5+9 = 14 <= 16, +3 overflows; 3+7 = 10, +8 overflows
    assert split_by_tokens([5, 9, 3, 7, 8], 16, packed=True) == [[0, 1], [2, 3], [4]]
    # padded: 2 x 9 = 18 > 16, so 9 starts a group; 3 and 7 make 2 x 7 = 14, 3 x 8 = 24 overflows
    assert split_by_tokens([5, 9, 3, 7, 8], 16, packed=False) == [[0], [1], [2, 3], [4]]
    assert split_by_tokens([4, 4, 4], 64, packed=True) == [[0, 1, 2]]
    # exactly `parts` groups: the largest is halved (each half fits, being part of one that did)
    assert split_by_tokens([4, 4, 4, 4, 4], 64, packed=True, parts=3) == [[0, 1], [2], [3, 4]]
    assert split_by_tokens([4, 4], 64, packed=True, parts=3) is None  # too few examples


def test_the_budget_is_checked_when_the_config_loads():
    base = {"model": {"name_or_path": "m"}, "data": {"train": "x.jsonl", "max_length": 64}}
    assert load_config(None, ["train.max_micro_batch_tokens=64"], **base).train.max_micro_batch_tokens == 64
    with pytest.raises(ConfigError, match="train.max_micro_batch_tokens: must be at least data.max_length"):
        load_config(None, ["train.max_micro_batch_tokens=63"], **base)
    with pytest.raises(ConfigError, match="train.max_micro_batch_tokens: applies to objective sft only"):
        load_config(None, ["train.max_micro_batch_tokens=64", "objective.name=dpo"], **base)


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_a_budget_keeps_the_step_and_bounds_every_forward(
    llama_dir, instruction_data, tmp_path, monkeypatch, packing
):
    """3 steps of 8 examples (max length 64), without a budget and with the smallest one (64 slots):
    the same losses and gradient norms to 1e-5; with the budget, more forward passes than micro-
    batches, and none holding more than 64 token slots (packed: the row; padded: rows x width)."""
    passes: dict[str, list[int]] = {}
    original = sft.sft_loss

    def counted(run, tensors):
        passes[run.config.output_dir].append(tensors["input_ids"].numel())  # (1, N) packed, (B, T) padded
        return original(run, tensors)

    monkeypatch.setattr(sft, "sft_loss", counted)
    figures = {}
    for name, budget in (("whole", "null"), ("budget", "64")):
        out = tmp_path / name
        config = sft_config(
            llama_dir,
            instruction_data[0],
            out,
            "train.max_steps=3",
            f"data.packing={str(packing).lower()}",
            f"train.max_micro_batch_tokens={budget}",
        )
        passes[str(out)] = []
        tunelab.train(config)
        figures[name] = [(row["loss"], row["grad_norm"]) for row in read_metrics(out)]
        passes[name] = passes.pop(str(out))
    assert len(passes["whole"]) == 3 and max(passes["whole"]) > 64  # the budget had work to do
    assert len(passes["budget"]) > 3 and max(passes["budget"]) <= 64
    for (loss, norm), (loss_b, norm_b) in zip(figures["whole"], figures["budget"], strict=True):
        assert loss_b == pytest.approx(loss, abs=1e-5) and norm_b == pytest.approx(norm, rel=1e-4)


def test_every_rank_runs_as_many_passes():
    """Under torchrun every rank must run the same number of forward passes (collective under FSDP):
    each splits its rows into as many as the rank that needs most, from the global batch alone."""
    from types import SimpleNamespace

    from tunelab.training.distributed import Parallel

    lengths = [60, 60, 60, 60, 10, 10, 10, 10]
    indices = [0, 4, 1, 5, 2, 6, 3, 7]  # rank 0: examples 0-3 (60 tokens each); rank 1: 4-7 (10 each)
    config = load_config(
        None,
        ["train.max_micro_batch_tokens=128", "data.packing=true"],
        model={"name_or_path": "m"},
        data={"train": "x.jsonl", "max_length": 64},
    )
    parts = {}
    for rank in (0, 1):
        run = SimpleNamespace(config=config, dist=Parallel(rank=rank, world_size=2))
        parts[rank] = sft.budget_parts(run, indices, lengths)
    assert parts[0] == [[0, 1], [2, 3]]  # 60 + 60 fits 128, a third does not
    assert parts[1] == [[4, 5], [6, 7]]  # 4 x 10 would fit in one: halved to match rank 0's 2 passes

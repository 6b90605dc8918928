"""The learning-rate schedule (`tunelab.training.optim.lr_at`) against transformers' schedulers and
hand-derived values: after warmup, step s of tunelab runs at transformers' lr for its 0-based step
s - 1; the first decayed step is the peak and the last is above the floor."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    get_cosine_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from tunelab.config import TrainConfig
from tunelab.training.optim import lr_at

PEAK = 3e-4


def transformers_lrs(schedule: str, total: int, warmup: int, min_lr_ratio: float = 0.0) -> list[float]:
    """The lr transformers' scheduler sets before each of `total` optimizer steps (0-based order)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=PEAK)
    if schedule == "linear":
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total)
    elif min_lr_ratio:
        scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, warmup, total, min_lr_rate=min_lr_ratio
        )
    else:
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total)
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("total,warmup", [(30, 0), (10, 3), (7, 1)])
def test_decay_matches_transformers_step_for_step(schedule, total, warmup):
    cfg = TrainConfig(lr=PEAK, schedule=schedule, warmup_steps=warmup)
    reference = transformers_lrs(schedule, total, warmup)
    for step in range(warmup + 1, total + 1):
        assert lr_at(step, total, cfg) == pytest.approx(reference[step - 1], rel=1e-12, abs=1e-18)


def test_cosine_floor_matches_transformers_min_lr_schedule():
    cfg = TrainConfig(lr=PEAK, schedule="cosine", warmup_steps=2, min_lr_ratio=0.1)
    reference = transformers_lrs("cosine", 12, 2, min_lr_ratio=0.1)
    assert [lr_at(s, 12, cfg) for s in range(3, 13)] == pytest.approx(reference[2:], rel=1e-12)


def test_warmup_starts_above_zero_and_reaches_the_peak():
    """tunelab's warmup: step s <= W runs at lr s / W (transformers' first step runs at 0)."""
    cfg = TrainConfig(lr=PEAK, schedule="linear", warmup_steps=4)
    assert [lr_at(s, 20, cfg) for s in range(1, 5)] == pytest.approx([PEAK * s / 4 for s in range(1, 5)])
    assert lr_at(5, 20, cfg) == pytest.approx(PEAK)  # the first decayed step is the peak


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_every_step_moves_the_weights(schedule):
    """No step runs at lr 0: the last one is one decay step above the floor (hand-derived)."""
    cfg = TrainConfig(lr=PEAK, schedule=schedule)
    total = 5
    lrs = [lr_at(s, total, cfg) for s in range(1, total + 1)]
    if schedule == "linear":
        expected = [PEAK * (1 - k / total) for k in range(total)]
    else:
        expected = [PEAK * 0.5 * (1 + math.cos(math.pi * k / total)) for k in range(total)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert min(lrs) > 0


def test_constant_schedule_is_the_peak_after_warmup():
    cfg = TrainConfig(lr=PEAK, schedule="constant", warmup_steps=2)
    assert [lr_at(s, 6, cfg) for s in range(1, 7)] == pytest.approx([PEAK / 2, PEAK] + [PEAK] * 4)

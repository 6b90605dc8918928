"""AdamW with decoupled weight decay on matrices only, and warmup + cosine/linear/constant schedules.

Schedule, for optimizer step s (1-based) of S, warmup W, peak lr, floor m = min_lr_ratio:

    lr(s) = lr * s / W                                   for s <= W
    lr(s) = lr * (m + (1 - m) * f(p)),  p = (s - 1 - W) / max(1, S - W)
        f(p) = 1                         constant
        f(p) = 1 - p                     linear
        f(p) = (1 + cos(pi * p)) / 2     cosine

The first step after warmup runs at the peak (p = 0) and the last at p = (S - W - 1) / (S - W), the
step before the floor: every step moves the weights. This is the decay of transformers'
`get_{linear,cosine}_schedule_with_warmup` step for step (`tests/unit/test_optim.py`); warmup
differs on purpose: its first step runs at lr / W where transformers' runs at 0.

The update runs as PyTorch's fused AdamW kernel on CPU and CUDA (one pass over all parameters,
the same update up to rounding), several times faster than the default per-parameter loop
(measured in BENCHMARKS.md).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tunelab.config import TrainConfig

FUSED_DEVICES = ("cpu", "cuda")
"""Devices where PyTorch has a fused AdamW kernel that we use."""


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on biases, norms and other 1-D tensors.
    Under FSDP2 the optimizer holds the shards: a root that keeps its gathered parameters after a
    forward pass (a held-out evaluation before training) is put back to them first."""
    from tunelab.training.distributed import reshard

    reshard(model)
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise RuntimeError("the method left no trainable parameter")
    fused = all(p.device.type in FUSED_DEVICES and p.is_floating_point() for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused or None)


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (1-based); see the module docstring."""
    if cfg.warmup_steps > 0 and step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    progress = min(1.0, (step - 1 - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    shape = {
        "constant": 1.0,
        "linear": 1.0 - progress,
        "cosine": 0.5 * (1.0 + math.cos(math.pi * progress)),
    }[cfg.schedule]
    floor = cfg.min_lr_ratio if cfg.schedule != "constant" else 1.0
    return cfg.lr * (floor + (1.0 - floor) * shape)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr

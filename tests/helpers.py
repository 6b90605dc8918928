"""Helpers shared by tests (import as `from tests.helpers import ...`)."""

from __future__ import annotations

PINNED_MODEL = {"dtype": "float32"}
"""`model:` keys that tests pin: the `auto` default depends on the machine (tunelab/defaults.py)."""
PINNED_TRAIN = {"precision": "fp32"}
"""`train:` keys that tests pin, for the same reason."""
PINNED = ["model.dtype=float32", "train.precision=fp32", "data.packing=false"]
"""The same pins (and padded rows) as overrides, for configs read from YAML files."""


def sft_config(model_dir, train_file, output_dir, *overrides, method=None, eval_file=None):
    """A small SFT run config for recipe tests (quiet, few steps; float32 weights, fp32 compute and
    padded rows pinned, not the machine-dependent `auto` defaults: tests compare exact figures)."""
    from tunelab.config import load_config

    sections = {
        "model": {"name_or_path": str(model_dir), **PINNED_MODEL},
        "method": method or {"name": "full"},
        "data": {"train": str(train_file), "max_length": 64, "template": "alpaca", "packing": False},
        "train": {"max_steps": 6, "batch_size": 8, "lr": 3e-3, "progress": False, "seed": 0, **PINNED_TRAIN},
        "eval": {"max_new_tokens": 8, "num_examples": 8},
        "output_dir": str(output_dir),
    }
    if eval_file is not None:
        sections["data"]["eval"] = str(eval_file)
    return load_config(None, list(overrides), **sections)


def rlhf_config(
    model_dir,
    output_dir,
    overrides,
    objective: dict,
    train_file,
    eval_file=None,
    method=None,
    train: dict | None = None,
    eval: dict | None = None,
):
    """A small preference or RL run config for recipe tests: the demo data's alpaca template,
    max length 128, quiet, seed 0, float32 weights, fp32 compute and padded rows pinned (not `auto`); `train` and
    `eval` add to (or replace) the `train:` and `eval:` sections, `overrides` are `key.sub=value`
    strings applied last."""
    from tunelab.config import load_config

    sections = {
        "model": {"name_or_path": str(model_dir), **PINNED_MODEL},
        "method": method or {"name": "full"},
        "objective": objective,
        "data": {"train": str(train_file), "template": "alpaca", "max_length": 128, "packing": False},
        "train": {"progress": False, "seed": 0, **PINNED_TRAIN, **(train or {})},
        "output_dir": str(output_dir),
    }
    if eval is not None:
        sections["eval"] = eval
    if eval_file is not None:
        sections["data"]["eval"] = str(eval_file)
    return load_config(None, list(overrides), **sections)

"""Helpers shared by tests (import as `from tests.helpers import ...`)."""

from __future__ import annotations


def sft_config(model_dir, train_file, output_dir, *overrides, method=None, eval_file=None):
    """A small SFT run config for recipe tests (quiet, fp32, few steps)."""
    from tunelab.config import load_config

    sections = {
        "model": {"name_or_path": str(model_dir)},
        "method": method or {"name": "full"},
        "data": {"train": str(train_file), "max_length": 64, "template": "alpaca"},
        "train": {"max_steps": 6, "batch_size": 8, "lr": 3e-3, "progress": False, "seed": 0},
        "eval": {"max_new_tokens": 8, "num_examples": 8},
        "output_dir": str(output_dir),
    }
    if eval_file is not None:
        sections["data"]["eval"] = str(eval_file)
    return load_config(None, list(overrides), **sections)

"""Helpers shared by tests (import as `from tests.helpers import ...`)."""

from __future__ import annotations

import traceback
from dataclasses import dataclass

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


@dataclass
class Outcome:
    """What a `tunelab` command line gave: exit code, stdout, stderr."""

    code: int
    out: str
    err: str


def run_in_process(argv: list[str], capsys) -> Outcome:
    """`tunelab.cli.main(argv)` in this process (what `tunelab ARGV` runs before `exit_now`): its
    exit code and what it printed, as a subprocess's would be; an exception that escapes `main` is
    code 1 with its traceback on stderr, as the user would see it. Each `python -m tunelab` costs
    7-8 s of imports (torch, transformers) on a 2-core machine."""
    from tunelab.cli import main

    capsys.readouterr()  # drop what earlier steps printed
    crash = ""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as stop:  # argparse
        code = stop.code if isinstance(stop.code, int) else 1
    except Exception:  # noqa: BLE001 - what escapes main() is a traceback for the user
        code, crash = 1, traceback.format_exc()
    out, err = capsys.readouterr()
    return Outcome(code, out, err + crash)


def params_with_lora(model, r: int) -> int:
    """Parameters of `model` plus those LoRA of rank r adds on every linear layer of its decoder
    blocks (`all-linear`): r (in + out) each, A and B. Counted from the loaded model itself."""
    import torch

    linears = [m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    return sum(p.numel() for p in model.parameters()) + sum(
        r * (m.in_features + m.out_features) for m in linears
    )

"""`tunelab train CONFIG.yaml [key.sub=value ...] [--resume]`."""

from __future__ import annotations

import argparse

from tunelab.commands.arguments import add_overrides

HELP = "train a model from a YAML config"
DESCRIPTION = (
    "Train with the config's method and objective. Overrides use dotted keys: "
    "`tunelab train run.yaml train.lr=1e-4 method.r=16 output_dir=runs/x`. "
    "A run's folder holds metrics.jsonl, checkpoints/step-N/, final/ and loss.png."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file")
    add_overrides(parser)
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")


def run(args) -> int:
    import tunelab

    overrides = list(args.overrides) + (["train.resume=true"] if args.resume else [])
    tunelab.train(tunelab.load_config(args.config, overrides))
    return 0

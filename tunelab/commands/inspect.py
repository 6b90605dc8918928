"""`tunelab inspect CONFIG`: what a config's fine-tuning method would wrap and train, and the
parameter counts, without loading weights (`tunelab.inspection` says how)."""

from __future__ import annotations

import argparse

HELP = "show what a config's method wraps and trains, and the parameter counts (no weights loaded)"
DESCRIPTION = (
    "Build the config's model on the meta device (no weights), apply its method, and print "
    "the wrapped modules, the trainable parameters and the counts."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a training config (YAML)")


def run(args: argparse.Namespace) -> int:
    """Print the description of the config's model under its method."""
    from tunelab.config import load_config
    from tunelab.inspection import inspect_model

    config = load_config(args.config)
    print(inspect_model(config.model.name_or_path, config.method.name, config.method.options))
    return 0

"""`tunelab inspect CONFIG`: show what a fine-tuning method would wrap and train, without weights
(`tunelab.inspection`).

The model is built from its config alone on PyTorch's `meta` device (shapes, no storage), so even a
7B model is inspected in a second; the method is applied to it as training would apply it, and we
print the wrapped modules, the trainable parameters grouped across decoder layers, and the count
(`trainable params: X || all params: Y || trainable%: Z`, as PEFT prints it).
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `inspect` command."""
    parser = subparsers.add_parser(
        "inspect",
        help="show what a config's method wraps and trains, and the parameter counts (no weights loaded)",
        description="Build the config's model on the meta device (no weights), apply its method, and print "
        "the wrapped modules, the trainable parameters and the counts.",
    )
    parser.add_argument("config", help="a training config (YAML)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the description of the config's model under its method."""
    from tunelab.config import load_config
    from tunelab.inspection import inspect_model

    config = load_config(args.config)
    print(inspect_model(config.model.name_or_path, config.method.name, config.method.options))
    return 0

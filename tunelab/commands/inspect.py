"""`tunelab inspect CONFIG`: what a config's fine-tuning method would wrap and train, the parameter
counts and the expected peak memory per device, without loading weights (`tunelab.inspection` and
`tunelab.memory_plan` say how)."""

from __future__ import annotations

import argparse

HELP = "show what a config's method wraps and trains, the parameter counts and the expected memory"
DESCRIPTION = (
    "Build the config's model on the meta device (no weights), apply its method, and print "
    "the wrapped modules, the trainable parameters, the counts and the expected peak memory per "
    "device; with --device-memory, whether the run fits and which switch would make it fit."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a training config (YAML)")
    parser.add_argument("--world-size", type=int, default=1, help="processes (train.strategy: fsdp shards)")
    parser.add_argument("--device-memory", default=None, help="memory of one device, e.g. 24GB or 80GiB")


def run(args: argparse.Namespace) -> int:
    """Print the description of the config's model under its method and its memory plan."""
    from tunelab.config import load_config
    from tunelab.inspection import inspect_model, memory_report
    from tunelab.memory_plan import parse_size

    device_memory = parse_size(args.device_memory) if args.device_memory is not None else None
    config = load_config(args.config)
    print(inspect_model(config.model.name_or_path, config.method.name, config.method.options))
    print(memory_report(config, args.world_size, device_memory))
    return 0

"""The `tunelab` command line: `tunelab COMMAND ...` (also `python -m tunelab COMMAND ...`).

Each command lives in `tunelab/commands/<name>.py` (`HELP`, `DESCRIPTION`, `add_arguments(parser)`,
`run(args)`; tunelab/commands/__init__.py). A `TunelabError` (bad config, bad data, missing model)
is printed as one line, without a traceback; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from tunelab import __version__
from tunelab.errors import Preempted, TunelabError

COMMANDS = ["train", "eval", "generate", "demo", "merge", "inspect", "score"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds an option's default to its help, unless there is none to show (None, or False for a flag)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunelab",
        description="Fine-tune pre-trained language models: full, partial, LoRA, adapters, prefix tuning; "
        "objectives sft, reward, dpo, ppo, grpo.",
    )
    parser.add_argument("--version", action="version", version=f"tunelab {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        command = importlib.import_module(f"tunelab.commands.{name}")
        command_parser = subparsers.add_parser(
            name, help=command.HELP, description=command.DESCRIPTION, formatter_class=HelpFormatter
        )
        command.add_arguments(command_parser)
        command_parser.set_defaults(func=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except TunelabError as err:
        print(f"tunelab {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Preempted as stop:
        print(f"tunelab {args.command}: {stop}; continue with --resume", file=sys.stderr)
        return Preempted.EXIT_STATUS
    except KeyboardInterrupt:
        print(f"tunelab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

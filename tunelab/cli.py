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
from tunelab.errors import Preempted, TunelabError, one_line

COMMANDS = ["train", "eval", "generate", "demo", "merge", "export", "push", "inspect", "score"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds an option's default to its help, unless there is none to show (None, or False for a flag)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The `tunelab` parser; `parser.commands` maps each command's name to its own parser."""
    parser = argparse.ArgumentParser(
        prog="tunelab",
        description="Fine-tune pre-trained language models: full, partial, LoRA, adapters, prefix tuning; "
        "objectives sft, reward, dpo, ppo, grpo.",
    )
    parser.add_argument("--version", action="version", version=f"tunelab {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.commands = {}
    for name in COMMANDS:
        command = importlib.import_module(f"tunelab.commands.{name}")
        command_parser = subparsers.add_parser(
            name, help=command.HELP, description=command.DESCRIPTION, formatter_class=HelpFormatter
        )
        command.add_arguments(command_parser)
        command_parser.set_defaults(func=command.run)
        parser.commands[name] = command_parser
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`argv` parsed; a command's options may come between or after its positional arguments
    (`tunelab train run.yaml --resume train.lr=1e-4`), which argparse's plain parsing refuses once
    the trailing overrides have begun. argparse cannot parse intermixed arguments through
    subparsers, so the command's own parser reads what follows the command's name (only then: its
    plain parsing words a missing argument better)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in parser.commands:
        rest = argv[1:]
        first = next((i for i, arg in enumerate(rest) if not arg.startswith("-")), len(rest))
        if any(arg.startswith("-") for arg in rest[first + 1 :]):
            args = parser.commands[argv[0]].parse_intermixed_args(rest)
            args.command = argv[0]
            return args
    return parser.parse_args(argv)


OUT_OF_MEMORY_ADVICE = (
    "out of memory: lower train.batch_size (raise train.grad_accum to keep the batch) or "
    "data.max_length, or set model.gradient_checkpointing=true or model.dtype=bfloat16; "
    "the last checkpoint is intact"
)


def out_of_memory(error: BaseException) -> bool:
    """Whether `error` is the machine or a device running out of memory (torch's OutOfMemoryError,
    Python's MemoryError, or an allocator's "out of memory" RuntimeError)."""
    import torch

    if isinstance(error, MemoryError | torch.OutOfMemoryError):
        return True
    return "out of memory" in str(error).lower() or "can't allocate memory" in str(error).lower()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parse_args(parser, argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except TunelabError as err:
        print(f"tunelab {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as error:
        if not out_of_memory(error):
            raise
        print(
            f"tunelab {args.command}: error: {OUT_OF_MEMORY_ADVICE} ({one_line(error)[:300]})",
            file=sys.stderr,
        )
        return 2
    except Preempted as stop:
        print(f"tunelab {args.command}: {stop}; continue with --resume", file=sys.stderr)
        return Preempted.EXIT_STATUS
    except KeyboardInterrupt:
        print(f"tunelab {args.command}: interrupted", file=sys.stderr)
        return 130


def console() -> None:
    """The `tunelab` command: `main()`, then an exit that skips tearing the interpreter down."""
    exit_now(main())


def exit_now(code: int) -> None:
    """Exit with `code` as a normal exit would, less the teardown: wait for the threads that
    would be waited for, run the `atexit` functions, flush the streams, then `os._exit`.

    Freeing every module and object one by one (torch, transformers and a trained model's graph)
    took 1.0-1.3 s at the end of each training job on 2 cores (the last second of a 58 s LoRA job
    on the benchmark workload, `strace -tt`); the system reclaims the memory anyway.
    """
    import atexit
    import threading

    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or a broken pipe: nothing left to write to
            pass
    os._exit(code)


if __name__ == "__main__":
    console()

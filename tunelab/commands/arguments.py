"""The options several commands share, so that each means the same in all of them: loading a
model, reading records, rendering prompts, config overrides."""

from __future__ import annotations

import argparse

DTYPE_NAMES = ("float32", "bfloat16", "float16")
"""The dtypes a command loads or saves weights in: `tunelab.models.DTYPES`'s names, written out here
so that building the parser imports neither torch nor transformers (`tunelab --help` at once)."""

TRAINED_PATH_HELP = "run folder, model folder, adapter folder or hub id"


def add_load_options(parser: argparse.ArgumentParser) -> None:
    """--dtype and --device of the model a command loads (`tunelab.models.load_model`)."""
    parser.add_argument("--dtype", default="float32", choices=list(DTYPE_NAMES))
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")


def add_template_option(parser: argparse.ArgumentParser, default: str) -> None:
    """--template: how prompts are rendered; `default` says where it comes from when not given."""
    parser.add_argument("--template", default=None, help=f"auto, alpaca or chat (default: {default})")


def add_records_options(parser: argparse.ArgumentParser, verb: str) -> None:
    """--split, --limit and --batch-size of a command that reads records and `verb`s them."""
    parser.add_argument("--split", default="train", help="split of a hub data set")
    parser.add_argument("--limit", type=int, default=None, help=f"{verb} at most this many records")
    parser.add_argument("--batch-size", type=int, default=16, help="records a forward pass")


def add_overrides(parser: argparse.ArgumentParser) -> None:
    """The trailing `key.sub=value` config overrides (`tunelab.config.apply_overrides`)."""
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")

"""`tunelab merge RUN_OR_ADAPTER_DIR --out DIR [--dtype D]`: fold a LoRA adapter into its base model
and save a standalone Hugging Face model (`tunelab.merging` says how and why it is exact)."""

from __future__ import annotations

import argparse

from tunelab.commands.arguments import DTYPE_NAMES

HELP = "merge a LoRA adapter into its base model and save a standalone Hugging Face model"
DESCRIPTION = (
    "Merge a LoRA adapter into its base model; save a standalone Hugging Face model "
    "(weights in the base's dtype, config, tokenizer)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a run folder (its final/ is used) or a LoRA adapter folder")
    parser.add_argument("--out", required=True, help="folder to write the merged model to")
    parser.add_argument(
        "--dtype", choices=list(DTYPE_NAMES), help="dtype of the saved weights (default: the base's)"
    )


def run(args: argparse.Namespace) -> int:
    """Merge and print where the model went."""
    from tunelab.merging import merge_adapter

    out = merge_adapter(args.path, args.out, args.dtype)
    print(f"merged model written to {out}")
    return 0

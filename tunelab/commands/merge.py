"""`tunelab merge RUN_OR_ADAPTER_DIR --out DIR [--dtype D]`: fold a LoRA adapter into its base model
(`tunelab.merging`).

LoRA's update is linear, W' = W + s B A, so the merged weights compute exactly what the base model
plus adapter computed, with no extra layers. The output folder is a plain Hugging Face model
(safetensors weights, config, tokenizer) that `AutoModelForCausalLM.from_pretrained` loads without
tunelab or PEFT. Bottleneck adapters cannot be merged: their update passes through a nonlinearity.
The merge runs in float32 and the result is stored in the base model's dtype unless `--dtype` says
otherwise.
"""

from __future__ import annotations

import argparse

from tunelab.models import DTYPES


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `merge` command."""
    parser = subparsers.add_parser(
        "merge",
        help="merge a LoRA adapter into its base model and save a standalone Hugging Face model",
        description="Merge a LoRA adapter into its base model; save a standalone Hugging Face model "
        "(weights in the base's dtype, config, tokenizer).",
    )
    parser.add_argument("path", help="a run folder (its final/ is used) or a LoRA adapter folder")
    parser.add_argument("--out", required=True, help="folder to write the merged model to")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), help="dtype of the saved weights (default: the base's)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Merge and print where the model went."""
    from tunelab.merging import merge_adapter

    out = merge_adapter(args.path, args.out, args.dtype)
    print(f"merged model written to {out}")
    return 0

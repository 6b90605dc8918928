"""`tunelab export RUN_OR_MODEL --format gguf [--type f16|bf16|q8_0|f32] [--out PATH]`: a GGUF file for
llama.cpp and Ollama, with a Modelfile and a model card (`tunelab.export.gguf_out`)."""

from __future__ import annotations

import argparse

HELP = "export a run, model or LoRA adapter as a GGUF file (llama.cpp, Ollama) with a Modelfile"
DESCRIPTION = (
    "Export a run (its final/), a model folder, a .gguf file or a LoRA adapter (merged into its base "
    "first) as one GGUF file, with an Ollama Modelfile and a model card (README.md) beside it. "
    "Architectures: Llama, Mistral, Qwen2, Phi-3, Gemma, Gemma 2, GPT-2. Then: ollama create NAME -f Modelfile."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "path", help="run folder, its final/, model folder, .gguf file or LoRA adapter folder"
    )
    parser.add_argument("--format", default="gguf", choices=["gguf"], help="file format")
    parser.add_argument(
        "--type",
        default="f16",
        choices=["f16", "bf16", "q8_0", "f32"],
        help="storage of the weight matrices (norms and biases stay f32); q8_0: 8-bit blocks of 32",
    )
    parser.add_argument(
        "--out", default=None, help="folder, or a path ending in .gguf (default: RUN/gguf/ or NAME-gguf/)"
    )


def run(args: argparse.Namespace) -> int:
    """Export and print where the files went."""
    from tunelab.errors import TunelabError

    try:
        from tunelab.export.gguf_out import export_gguf
    except ModuleNotFoundError as err:
        if err.name != "gguf":
            raise
        raise TunelabError("GGUF export needs the gguf package: pip install 'tunelab[export]'") from None

    exported = export_gguf(args.path, args.out, args.type)
    for note in exported.notes:
        print(f"note: {note}")
    print(f"GGUF ({args.type}, {exported.tensors} tensors) written to {exported.gguf_file}")
    print(f"Ollama: ollama create NAME -f {exported.modelfile}")
    return 0

"""A `.gguf` file as a model source: `model.name_or_path: path/to/model.gguf`.

transformers reads GGUF itself (`from_pretrained(folder, gguf_file=name)`): it rebuilds the config
and the tokenizer from the file's metadata and dequantises every tensor to the requested dtype, undoing
llama.cpp's layouts (rotary row order, Conv1D transposes). The model then trains like any other; the
dequantised weights are what it starts from (a q8_0 file starts from its quantised values). Which
architectures it reads is transformers' list (`GGUF_SUPPORTED_ARCHITECTURES`); among tunelab's tested
ones: Llama, Mistral, Qwen2, Phi-3, GPT-2 and Gemma 2, not Gemma (1).
"""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import TunelabError


def is_gguf(name_or_path: str | Path) -> bool:
    """Whether `name_or_path` names a GGUF file (by its suffix)."""
    return str(name_or_path).lower().endswith(".gguf")


def gguf_source(name_or_path: str) -> tuple[str, dict]:
    """`from_pretrained`'s (first argument, extra keyword arguments) for `name_or_path`: a `.gguf` file
    becomes (its folder, {"gguf_file": its name}); anything else passes unchanged with no extras."""
    if not is_gguf(name_or_path):
        return name_or_path, {}
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise TunelabError(f"GGUF file {name_or_path!r} does not exist")
    return str(path.parent), {"gguf_file": path.name}


def plain_model(model):
    """A model transformers loaded from a GGUF, as an ordinary model; any other model as it is.

    transformers marks a model read from GGUF as quantised by GGUF (`hf_quantizer`), even when it
    dequantised every tensor into plain layers (its path for the architectures here), and then refuses
    to save it. Once no layer is left packed, the mark is removed; a layer still packed (a newer
    transformers keeping some architectures' blocks) is a `TunelabError`, since it cannot train."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or getattr(quantizer.quantization_config, "quant_method", None) != "gguf":
        return model
    packed = [name for name, module in model.named_modules() if type(module).__name__ == "GgufLinear"]
    if packed:
        raise TunelabError(
            f"transformers kept {len(packed)} layers of the GGUF packed (e.g. {packed[0]}); tunelab trains "
            "dequantised weights only"
        )
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model

"""Finding modules in a Hugging Face causal LM: decoder layers, and modules by name pattern.

Shared by every method so that they all read the model's structure the same way.
"""

from __future__ import annotations

import re

from torch import nn

from tunelab.errors import TunelabError


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks of a causal LM: (their qualified name, the `ModuleList`).

    Hugging Face models keep them in a `ModuleList` named `layers` (Llama, Qwen2, Mistral, Gemma,
    Phi-3: `model.layers`) or `h` (GPT-2: `transformer.h`). We take the largest such list.
    """
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks")
    ]
    if not candidates:
        raise TunelabError(
            f"cannot find the decoder layers of {type(model).__name__}: no ModuleList named "
            "'layers', 'h' or 'blocks'"
        )
    return max(candidates, key=lambda item: len(item[1]))


def layer_index(param_or_module_name: str, layers_prefix: str) -> int | None:
    """The decoder layer a name belongs to (`model.layers.3.mlp` -> 3), or None outside the layers."""
    match = re.match(re.escape(layers_prefix) + r"\.(\d+)(\.|$)", param_or_module_name)
    return int(match.group(1)) if match else None


def name_matches(name: str, patterns: list[str] | str) -> bool:
    """Does module name `name` match? A list matches by suffix on dotted boundaries
    (`q_proj` matches `model.layers.0.self_attn.q_proj`); a string is a regular expression that
    must match the whole name."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def select_layers(num_layers: int, layers: list[int] | None, last: int | None) -> set[int]:
    """Layer indices chosen by an explicit list (negative counts from the end) or the last N."""
    if layers is not None and last is not None:
        raise TunelabError("choose layers either by index list or by 'last N', not both")
    if layers is None and last is None:
        return set(range(num_layers))
    if last is not None:
        if not 0 <= last <= num_layers:
            raise TunelabError(f"asked for the last {last} layers of a model with {num_layers}")
        return set(range(num_layers - last, num_layers))
    chosen = set()
    for i in layers:
        if not -num_layers <= i < num_layers:
            raise TunelabError(f"layer index {i} out of range for a model with {num_layers} layers")
        chosen.add(i % num_layers)
    return chosen

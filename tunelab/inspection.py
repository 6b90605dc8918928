"""What a fine-tuning method would wrap and train, without weights (`tunelab inspect`).

The model is built from its config alone on PyTorch's `meta` device (shapes, no storage), so even a
7B model is inspected in a second; the method is applied to it as training would apply it, and we
print the wrapped modules, the trainable parameters grouped across decoder layers, and the count
(`trainable params: X || all params: Y || trainable%: Z`, as PEFT prints it).
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict

import torch
from torch import nn

from tunelab.errors import TunelabError
from tunelab.methods import get_method, parameter_report
from tunelab.methods.inject import decoder_layers


def build_meta_model(model_config_name_or_path: str, trust_remote_code: bool = False) -> nn.Module:
    """A causal LM of the named architecture with parameters on the meta device (no memory, no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_config_name_or_path, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise TunelabError(f"cannot read a model config from {model_config_name_or_path!r}: {err}") from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def _grouped(names: list[str], layers_prefix: str | None) -> dict[str, list[str]]:
    """Group names that differ only in their decoder-layer index: pattern (index as `*`) -> names."""
    groups: dict[str, list[str]] = defaultdict(list)
    for name in names:
        pattern = name
        if layers_prefix is not None:
            pattern = re.sub(rf"^{re.escape(layers_prefix)}\.\d+(\.|$)", rf"{layers_prefix}.*\1", name)
        groups[pattern].append(name)
    return groups


def describe(model: nn.Module) -> str:
    """The wrapped modules, the trainable parameters (grouped over layers) and the count report."""
    try:
        prefix = decoder_layers(model)[0]
    except TunelabError:
        prefix = None
    modules = dict(model.named_modules())
    wrapped = [n for n, m in modules.items() if n and type(m).__module__.startswith("tunelab.")]
    # Only the outermost wrappers: a wrapper's own submodules (lora_A, ...) are listed with it.
    wrapped = [n for n in wrapped if not any(n.startswith(w + ".") for w in wrapped)]
    lines = [f"wrapped modules ({len(wrapped)}):"]
    for pattern, group in _grouped(wrapped, prefix).items():
        module = modules[group[0]]
        lines.append(f"  {pattern}  x{len(group)}  {type(module).__name__}({module.extra_repr()})")
    if not wrapped:
        lines.append("  (none)")
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    lines.append(f"trainable parameters ({len(trainable)} tensors):")
    shapes = dict(trainable)
    for pattern, group in _grouped([n for n, _ in trainable], prefix).items():
        shape = tuple(shapes[group[0]].shape)
        numel = sum(shapes[n].numel() for n in group)
        lines.append(f"  {pattern}  x{len(group)}  {shape}  = {numel:,d}")
    lines.append(parameter_report(model))
    return "\n".join(lines)


def inspect_model(model_config_name_or_path: str, method_name: str, method_options) -> str:
    """Build the model on the meta device, apply method `method_name` with `method_options` (its
    `Options`, or a dict of them), and return the description printed by `tunelab inspect`."""
    method = get_method(method_name)
    if isinstance(method_options, dict):
        try:
            method_options = method.Options(**method_options)
        except (TypeError, ValueError) as err:
            raise TunelabError(f"method {method_name!r}: {err}") from None
    model = build_meta_model(model_config_name_or_path)
    method.apply(model, method_options)
    header = f"model: {model_config_name_or_path} ({type(model).__name__}, meta device: no weights loaded)"
    options = ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(method_options).items())
    return f"{header}\nmethod: {method_name} ({options})\n{describe(model)}"

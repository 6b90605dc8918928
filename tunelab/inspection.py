"""What a fine-tuning method would wrap and train, without weights (`tunelab inspect`).

The model is built from its config alone on PyTorch's `meta` device (shapes, no storage), so even a
7B model is inspected in a second; the method is applied to it as training would apply it, and we
print the wrapped modules, the trainable parameters grouped across decoder layers, and the count
(`trainable params: X || all params: Y || trainable%: Z`, as PEFT prints it); then the expected
peak memory per device (`tunelab.memory_plan`) and, given the device's memory, whether the run fits.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict

import torch
from torch import nn

from tunelab.config import RunConfig
from tunelab.errors import TunelabError
from tunelab.memory_plan import MemoryPlan, alternatives, describe_plan, fmt, plan
from tunelab.methods import get_method, parameter_report
from tunelab.methods.inject import decoder_layers


def build_meta_model(
    model_config_name_or_path: str, trust_remote_code: bool = False, dtype: str = "float32"
) -> nn.Module:
    """A causal LM of the named architecture with parameters on the meta device (no memory, no
    weights), in `dtype`. The name may be a hub id, a model folder, a `.gguf` file (its metadata) or
    an earlier run or adapter folder (the base model at the bottom of its chain)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunelab.export.gguf_in import config_source
    from tunelab.trained import root_model

    source, extra = config_source(root_model(model_config_name_or_path))
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
    except OSError as err:
        raise TunelabError(f"cannot read a model config from {model_config_name_or_path!r}: {err}") from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(
            config, trust_remote_code=trust_remote_code, dtype=getattr(torch, dtype)
        )


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


def estimate_memory(config: RunConfig, world_size: int = 1) -> MemoryPlan:
    """The expected peak memory per device of training under `config` (`tunelab.memory_plan`): the
    model built on the meta device at `model.dtype`, the config's method applied."""
    method = get_method(config.method.name)
    model = build_meta_model(config.model.name_or_path, dtype=config.model.dtype)
    method.apply(model, config.method.options)
    return plan(model, config, world_size)


def memory_report(config: RunConfig, world_size: int = 1, device_memory: int | None = None) -> str:
    """The plan's lines; with `device_memory` (bytes) whether it fits, and if not, each switch that
    lowers the peak with its new estimate, marked where it fits."""
    memory = estimate_memory(config, world_size)
    lines = [describe_plan(memory, config)]
    if device_memory is None:
        return "\n".join(lines)
    if memory.total <= device_memory:
        lines.append(f"fits in {fmt(device_memory)} ({fmt(device_memory - memory.total)} to spare)")
        return "\n".join(lines)
    lines.append(f"does not fit in {fmt(device_memory)}; each switch alone:")
    fits = False
    for change, changed in alternatives(config):
        total = estimate_memory(changed, world_size).total
        fits = fits or total <= device_memory
        lines.append(
            f"  {change:<48} {fmt(total):>10}  {'fits' if total <= device_memory else 'does not fit'}"
        )
    if not fits:
        lines.append(combined_switches(config, world_size, device_memory))
    return "\n".join(lines)


def combined_switches(config: RunConfig, world_size: int, device_memory: int) -> str:
    """When no switch fits alone: take them together, greedily (each time the one that lowers the
    estimate most), until the estimate fits; the line saying which and how much."""
    taken: dict[str, str] = {}  # option -> its setting; a later halving replaces an earlier one
    total = estimate_memory(config, world_size).total
    while total > device_memory:
        options = [(estimate_memory(c, world_size).total, change, c) for change, c in alternatives(config)]
        best = min(options, key=lambda option: option[0]) if options else None
        if best is None or best[0] >= total:
            return f"  no combination of these fits (the best: {fmt(total)})"
        total, change, config = best
        taken[change.split("=")[0]] = change
    return f"  together: {', '.join(taken.values())}  {fmt(total)}  fits"

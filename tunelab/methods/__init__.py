"""Fine-tuning methods: transformations of a model that decide what trains.

Every method is a module here with the same four names:

- `Options`: a dataclass of the method's options (a docstring per field);
- `apply(model, options) -> None`: transform the model in place and freeze what must not train.
  Afterwards `requires_grad` marks exactly the trainable parameters: that one mechanism decides
  what the optimizer sees, what a checkpoint saves and what the report counts;
- `save(model, options, out_dir, base_model) -> None`: write the final artifact (a Hugging Face
  model folder for full/partial; the adapter alone, in PEFT's format where one exists);
- `load(model, adapter_dir) -> None` (adapter methods): re-apply a saved adapter to a base model.

Adapter methods also give `disabled(model)`, a context manager under which the model computes the
base model's outputs (the reference policy for DPO/PPO/GRPO, without a second copy).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from torch import nn

from tunelab.errors import TunelabError

# Name in the config -> module. Listed explicitly so that `grep` finds every method.
METHOD_MODULES = {
    "full": "tunelab.methods.full",
    "partial": "tunelab.methods.partial",
    "lora": "tunelab.methods.lora",
    "adapter": "tunelab.methods.adapter",
    "prefix": "tunelab.methods.prefix",
}


def get_method(name: str) -> ModuleType:
    """The module implementing method `name`."""
    if name not in METHOD_MODULES:
        raise TunelabError(f"unknown method {name!r}; choose one of {sorted(METHOD_MODULES)}")
    return importlib.import_module(METHOD_MODULES[name])


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Name -> parameter for every parameter that trains (`requires_grad`)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts; shared (tied) parameters are counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def parameter_report(model: nn.Module) -> str:
    """`trainable params: X || all params: Y || trainable%: Z`, as PEFT prints it."""
    trainable, total = count_parameters(model)
    return (
        f"trainable params: {trainable:,d} || all params: {total:,d} "
        f"|| trainable%: {100 * trainable / max(total, 1):.4f}"
    )


def freeze_all(model: nn.Module) -> None:
    """Set `requires_grad = False` on every parameter."""
    for p in model.parameters():
        p.requires_grad_(False)

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
import json
from pathlib import Path
from types import ModuleType

import torch
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


def adapter_method_of(adapter_dir: Path) -> str:
    """Which method saved the adapter in `adapter_dir` (from its `adapter_config.json`)."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if "tunelab_method" in config:
        return config["tunelab_method"]
    peft_type = config.get("peft_type")
    by_peft_type = {"LORA": "lora", "PREFIX_TUNING": "prefix"}
    if peft_type not in by_peft_type:
        raise TunelabError(f"{adapter_dir}: adapter type {peft_type!r} is not supported by tunelab")
    return by_peft_type[peft_type]


def resolve_model_dir(path: str | Path) -> Path:
    """A run folder means its `final/`; a model or adapter folder means itself."""
    path = Path(path)
    if (path / "final").is_dir() and not (path / "config.json").exists():
        return path / "final"
    return path


def load_trained(
    path: str | Path,
    dtype: str = "float32",
    device: str | torch.device = "auto",
    base_model: str | None = None,
    trust_remote_code: bool = False,
):
    """Load a trained run, model folder or adapter folder for inference: (model, tokenizer, method).

    An adapter folder (`adapter_config.json`) is applied to its base model, read from
    `base_model_name_or_path` unless `base_model` overrides it. The tokenizer comes from the folder
    when it holds one, else from the base model.
    """
    from tunelab.models import load_model, load_tokenizer

    model_dir = resolve_model_dir(path)
    if not model_dir.exists():
        raise TunelabError(f"model path {str(path)!r} does not exist")
    if (model_dir / "adapter_config.json").exists():
        config = json.loads((model_dir / "adapter_config.json").read_text())
        base = base_model or config.get("base_model_name_or_path")
        if not base:
            raise TunelabError(f"{model_dir}/adapter_config.json names no base model; pass one")
        method = adapter_method_of(model_dir)
        model = load_model(base, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        get_method(method).load(model, model_dir)
        has_tokenizer = (model_dir / "tokenizer_config.json").exists()
        tokenizer = load_tokenizer(str(model_dir) if has_tokenizer else base, trust_remote_code)
    else:
        model = load_model(str(model_dir), dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        tokenizer = load_tokenizer(str(model_dir), trust_remote_code)
        method = "full"
    model.eval()
    return model, tokenizer, method

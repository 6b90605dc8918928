"""Fine-tuning methods: transformations of a model that decide what trains.

Every method is a module here (`METHOD_MODULES`) that defines every member of `Method`, the
contract below, so that no caller needs to ask which members a method has. Afterwards `apply` leaves
`requires_grad` marking exactly the trainable parameters: that one mechanism decides what the
optimizer sees, what a checkpoint saves and what the report counts (`trainable_parameters`,
`count_parameters`, `parameter_report`).
"""

from __future__ import annotations

import importlib
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol, cast, runtime_checkable

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


@runtime_checkable
class Method(Protocol):
    """The method contract. Each method module defines these names at module level (a module
    satisfies a `Protocol` as an object would; `self` below is the module).

    | member               | full          | partial       | lora          | adapter       | prefix        |
    | -------------------- | ------------- | ------------- | ------------- | ------------- | ------------- |
    | `Options`            | no fields     | what trains   | r, alpha, ... | placement, b  | m, MLP, text  |
    | `apply`              | all trains    | chosen train  | wrap, B = 0   | W_up = 0      | add prefix    |
    | `save`               | HF model      | HF model      | PEFT LORA     | tunelab files | PEFT PREFIX   |
    | `load`               | RuntimeError  | RuntimeError  | re-apply      | re-apply      | re-apply      |
    | `DISABLES_TO_BASE`   | False         | False         | True          | True          | True          |
    | `disabled`           | RuntimeError  | RuntimeError  | LoRA off      | adapters off  | prefix off    |

    - `apply(model, options)`: full makes every parameter trainable; partial freezes all, then
      unfreezes the chosen layers and modules; lora wraps each target in a `LoRALinear` (B = 0) and
      each `modules_to_save` entry in a `SavedModule`; adapter inserts bottleneck adapters (W_up = 0);
      prefix adds `prefix_encoder` and wraps `forward`. The adapter methods freeze everything else.
    - `save(model, options, out_dir, base_model)`: full and partial write a Hugging Face model folder;
      lora and prefix a PEFT adapter folder (prefix with its MLP folded into plain vectors); adapter
      the same two files with tunelab's own config (`adapter_files`).
    - `load(model, adapter_dir, trainable=False)`: the adapter methods apply the saved options to
      the base `model` and copy the saved tensors in, strictly (`tunelab.weights.load_into`); prefix
      loads plain vectors (no MLP). Full and partial raise `RuntimeError`: their artifact is a whole
      model, loaded as one (`tunelab.trained.load_trained`).
    - `disabled(model)`: lora turns the low-rank paths off (merged layers are unmerged meanwhile)
      and uses the originals of `modules_to_save`; adapter turns the adapters off and swaps the base
      layer-norm weights back in; prefix turns the prefix off. Full and partial raise `RuntimeError`:
      the base weights are gone, a reference must be a frozen copy.

    `load(..., trainable=True)` leaves exactly the parameters trainable that `apply` with the loaded
    options makes trainable, so a loaded adapter can be trained further; the default leaves the whole
    model frozen (inference). Both are the same for lora, adapter and prefix.

    `disabled(model)` is a context manager: inside it the model computes the base model's outputs
    and the context yields the model; on exit the previous state comes back, and nesting it is
    harmless. On a model that holds none of the method's layers it raises `RuntimeError` (a
    programming error, not a user's: `TunelabError` is for what a user can fix from the CLI).
    """

    Options: type
    """The method's options, a dataclass with a docstring per field."""
    DISABLES_TO_BASE: bool
    """Can the method be switched off (`disabled`) to give the base model back? If not, a reference
    model must be a frozen copy."""

    def apply(self, model: nn.Module, options: object) -> None:
        """Transform `model` in place; afterwards only what the method trains requires gradients."""

    def save(self, model: nn.Module, options: object, out_dir: Path, base_model: str) -> None:
        """Write the final artifact of a run into `out_dir`."""

    def load(self, model: nn.Module, adapter_dir: Path, trainable: bool = False) -> None:
        """Re-apply the artifact saved in `adapter_dir` to the base `model`, in place."""

    def disabled(self, model: nn.Module) -> AbstractContextManager[nn.Module]:
        """A context under which `model` computes the base model's outputs; it yields `model`."""


def get_method(name: str) -> Method:
    """The module implementing method `name`."""
    if name not in METHOD_MODULES:
        raise TunelabError(f"unknown method {name!r}; choose one of {sorted(METHOD_MODULES)}")
    return cast(Method, importlib.import_module(METHOD_MODULES[name]))


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

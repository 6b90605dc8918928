"""Full fine-tuning: every parameter of the model trains.

Update rule: theta <- AdamW(theta, grad L(theta)) for all theta. Nothing is wrapped; the final
artifact is a Hugging Face model folder (`save_pretrained`) plus the tokenizer.

The trained weights replace the base model's, so the method cannot be switched off to give the base
model back (`DISABLES_TO_BASE = False`: a reference policy is a frozen copy), and there is no
adapter to re-apply: `load` and `disabled` raise (see the contract in `tunelab.methods`). Partial
fine-tuning shares `save`, `load` and `disabled` with this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from torch import nn
from transformers import PreTrainedModel

DISABLES_TO_BASE = False


@dataclass
class Options:
    """Full fine-tuning has no options."""


def apply(model: PreTrainedModel, options: Options) -> None:
    """Make every parameter trainable."""
    for p in model.parameters():
        p.requires_grad_(True)


def save(model: PreTrainedModel, options: Options, out_dir: Path, base_model: str) -> None:
    """Write the whole model in Hugging Face format (safetensors)."""
    model.save_pretrained(out_dir, safe_serialization=True)


def load(model: nn.Module, adapter_dir: Path, trainable: bool = False) -> NoReturn:
    """Always raises `RuntimeError`: the artifact is a whole model, with no adapter to re-apply to a
    base model; load the folder itself (`tunelab.trained.load_trained`, `tunelab.models.load_model`)."""
    raise RuntimeError(
        f"{adapter_dir}: full and partial fine-tuning save a whole model, not an adapter to re-apply; "
        "load the folder as a model (tunelab.trained.load_trained)"
    )


def disabled(model: nn.Module) -> NoReturn:
    """Always raises `RuntimeError`: the trained weights replaced the base model's, so nothing can be
    switched off (`DISABLES_TO_BASE` is False; keep a frozen copy of the base model instead)."""
    raise RuntimeError(
        "full and partial fine-tuning cannot be disabled to give the base model "
        "(DISABLES_TO_BASE is False): use a frozen copy of the model as the reference"
    )

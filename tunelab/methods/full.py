"""Full fine-tuning: every parameter of the model trains.

Update rule: theta <- AdamW(theta, grad L(theta)) for all theta. Nothing is wrapped; the final
artifact is a Hugging Face model folder (`save_pretrained`) plus the tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedModel


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

"""Trained models for inference: a run folder, a model folder or an adapter folder, loaded whole.

A run folder means its `final/`. A folder with `adapter_config.json` is an adapter (tunelab's or
PEFT's): its base model is loaded from `base_model_name_or_path` and the adapter's method re-applied
(`Method.load` of `tunelab.methods`, frozen). Any other folder is a Hugging Face model (full or
partial fine-tuning).
"""

from __future__ import annotations

from pathlib import Path

import torch

from tunelab.errors import TunelabError
from tunelab.methods import get_method
from tunelab.methods.adapter_files import config_error, config_field, is_adapter_folder, read_adapter_config
from tunelab.models import load_model, load_tokenizer

ADAPTER_METHODS = ("lora", "adapter", "prefix")  # the methods whose artifact is an adapter folder


def adapter_method_of(adapter_dir: Path) -> str:
    """Which method saved the adapter in `adapter_dir` (from its `adapter_config.json`)."""
    config = read_adapter_config(adapter_dir)
    if "tunelab_method" in config:
        method = config["tunelab_method"]
        if method not in ADAPTER_METHODS:
            raise config_error(
                adapter_dir,
                "tunelab_method",
                f"unknown adapter method {method!r}; tunelab saves {ADAPTER_METHODS}",
            )
        return method
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
    model_dir = resolve_model_dir(path)
    if not model_dir.exists():
        raise TunelabError(f"model path {str(path)!r} does not exist")
    if is_adapter_folder(model_dir):
        config = read_adapter_config(model_dir)
        base = base_model or config_field(config, model_dir, "base_model_name_or_path", "str", required=False)
        if not base:
            raise TunelabError(f"{model_dir}/adapter_config.json names no base model; pass one")
        method = adapter_method_of(model_dir)
        model = load_model(base, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        get_method(method).load(model, model_dir, trainable=False)
        has_tokenizer = (model_dir / "tokenizer_config.json").exists()
        tokenizer = load_tokenizer(str(model_dir) if has_tokenizer else base, trust_remote_code)
    else:
        if model_dir.is_dir() and not (model_dir / "config.json").is_file():
            raise TunelabError(
                f"{model_dir} is neither a model folder (config.json) nor an adapter folder (adapter_config.json)"
            )
        model = load_model(str(model_dir), dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        tokenizer = load_tokenizer(str(model_dir), trust_remote_code)
        method = "full"
    model.eval()
    return model, tokenizer, method

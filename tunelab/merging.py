"""Fold a LoRA adapter into its base model (`tunelab merge`).

LoRA's update is linear, W' = W + s B A, so the merged weights compute exactly what the base model
plus adapter computed, with no extra layers. The output folder is a plain Hugging Face model
(safetensors weights, config, tokenizer) that `AutoModelForCausalLM.from_pretrained` loads without
tunelab or PEFT. Bottleneck adapters cannot be merged: their update passes through a nonlinearity.
The merge runs in float32 and the result is stored in the base model's dtype unless `--dtype` says
otherwise.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.methods import lora
from tunelab.methods.adapter_files import is_adapter_folder, read_adapter_config
from tunelab.models import DTYPES
from tunelab.trained import adapter_method_of, load_trained, resolve_model_dir


def base_dtype(base_model: str) -> str:
    """The dtype the base model's config records (`float32` when it records none we know)."""
    from transformers import AutoConfig

    dtype = getattr(AutoConfig.from_pretrained(base_model), "dtype", None)
    name = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    return name if name in DTYPES else "float32"


def merge_adapter(path: str | Path, out_dir: str | Path, dtype: str | None = None) -> Path:
    """Merge the LoRA adapter of a run folder or adapter folder into its base; save to `out_dir`.

    Returns `out_dir`. Raises `TunelabError` for a folder that is not a LoRA adapter.
    """
    adapter_dir = resolve_model_dir(path)
    if not is_adapter_folder(adapter_dir):
        if (adapter_dir / "config.json").exists():
            raise TunelabError(
                f"{adapter_dir} already holds a full model (no adapter): there is nothing to merge"
            )
        raise TunelabError(f"{path} is neither a run folder nor an adapter folder (no adapter_config.json)")
    method = adapter_method_of(adapter_dir)
    if method != "lora":
        raise TunelabError(
            f"{adapter_dir}: a {method!r} adapter cannot be merged into the base weights (its update goes "
            "through a nonlinearity, it is not a weight delta); only LoRA adapters merge. Load the adapter "
            "with its base model instead (tunelab eval/generate do this)."
        )
    if dtype is not None and dtype not in DTYPES:
        raise TunelabError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    config = read_adapter_config(adapter_dir)
    model, tokenizer, _ = load_trained(adapter_dir, dtype="float32", device="cpu")
    target_dtype = dtype or base_dtype(config["base_model_name_or_path"])
    model = lora.merge_and_unload(model)
    model = model.to(DTYPES[target_dtype])
    model.config.dtype = DTYPES[target_dtype]
    for p in model.parameters():
        p.requires_grad_(False)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir

"""Fold a LoRA adapter into its base model (`tunelab merge`).

LoRA's update is linear, W' = W + s B A, so the merged weights compute exactly what the base model
plus adapter computed, with no extra layers. The output folder is a plain Hugging Face model
(safetensors weights, config, tokenizer) that `AutoModelForCausalLM.from_pretrained` loads without
tunelab or PEFT. Bottleneck adapters cannot be merged: their update passes through a nonlinearity.
The merge runs in float32 and the result is stored in the base model's dtype unless `--dtype` says
otherwise.

A QLoRA run (trained on a quantised base, `model.quantization`) merges the same way: its adapter
files hold only A, B (and DoRA's m), so the base is reloaded unquantised from
`base_model_name_or_path` and the adapter folded into the full-precision weights (folding it into
the 4-bit weights would requantise them and lose most of the update); one line says so.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.console import note
from tunelab.errors import TunelabError
from tunelab.file_modes import match_umask
from tunelab.methods import lora
from tunelab.methods.adapter_files import is_adapter_folder, read_adapter_config
from tunelab.model_card import write_merged_card
from tunelab.models import DTYPES
from tunelab.trained import adapter_method_of, load_trained, resolve_model_dir, root_model


def base_dtype(base_model: str) -> str:
    """The dtype the base model's config records (`float32` when it records none we know). A base
    that is an earlier run means the model at the bottom of its chain; a `.gguf` file, its folder."""
    from transformers import AutoConfig

    from tunelab.export.gguf_in import gguf_source

    source, gguf_file = gguf_source(root_model(base_model))
    dtype = getattr(AutoConfig.from_pretrained(source, **gguf_file), "dtype", None)
    name = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    return name if name in DTYPES else "float32"


def quantized_bits(adapter_dir: Path) -> int | None:
    """The `model.quantization.bits` of the run that trained `adapter_dir` (from the run folder's
    `config.yaml`, beside `final/`), or None: not quantised, or not a tunelab run folder."""
    import yaml

    for config_file in (adapter_dir / "config.yaml", adapter_dir.parent / "config.yaml"):
        if config_file.is_file():
            try:
                config = yaml.safe_load(config_file.read_text())
            except (OSError, UnicodeDecodeError, yaml.YAMLError):
                return None
            model = config.get("model") if isinstance(config, dict) else None
            quantization = model.get("quantization") if isinstance(model, dict) else None
            bits = quantization.get("bits") if isinstance(quantization, dict) else None
            return bits if bits in (4, 8) else None
    return None


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
    bits = quantized_bits(adapter_dir)
    if bits is not None:
        note(
            f"[tunelab] this run trained on a {bits}-bit quantised base: merging into the full-precision "
            f"base reloaded from {config['base_model_name_or_path']}"
        )
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
    match_umask(out_dir)  # safetensors writes 0600 files
    write_merged_card(out_dir, adapter_dir)  # README.md, tunelab/model_card.py
    return out_dir

"""LoRA adapter files in PEFT's format, so that PEFT and tunelab read each other's adapters.

A folder holds two files (written and read by `tunelab.methods.adapter_files`):

- `adapter_config.json`: PEFT's `LoraConfig` as JSON (`peft_type: LORA`, `r`, `lora_alpha`, ...).
- `adapter_model.safetensors`: one tensor per key,
  `base_model.model.<module path>.lora_A.weight` (r, in) and `...lora_B.weight` (out, r) for every
  wrapped layer, and `base_model.model.<module path>.<param>` (e.g. `base_model.model.lm_head.weight`)
  for every module in `modules_to_save`, as PEFT 0.21 writes them (it drops the `.default` adapter
  name and the `modules_to_save.default` level); with DoRA (`use_dora: true`) also
  `base_model.model.<module path>.lora_magnitude_vector` (out,) for every wrapped layer.

A QLoRA adapter (trained on a quantised base) is the same files: only A, B (and m) are saved, never
the base, so it loads on the full-precision base and on a quantised one alike.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tunelab.errors import TunelabError
from tunelab.methods.adapter_files import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    config_field,
    read_adapter_config,
    read_adapter_weights,
)
from tunelab.methods.lora_layer import LoRALinear, SavedModule

PREFIX = "base_model.model."
PEFT_VERSION = "0.21.2"

# PEFT options that change the maths, with the (off) values we write; a file that turns one of them
# on is refused rather than loaded wrongly.
UNSUPPORTED_PEFT_OPTIONS = {
    "lora_bias": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layers_to_transform": None,
    "layers_pattern": None,
    "exclude_modules": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "layer_replication": None,
    "use_qalora": False,
    "use_bdlora": None,
}


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT key -> the live tensor it saves from and loads into (see the module docstring): A and B
    of every `LoRALinear`, the parameters and buffers of every `SavedModule`'s trained copy."""
    live = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            live[f"{PREFIX}{name}.lora_A.weight"] = module.lora_A.weight
            live[f"{PREFIX}{name}.lora_B.weight"] = module.lora_B.weight
            if module.use_dora:
                live[f"{PREFIX}{name}.lora_magnitude_vector"] = module.lora_magnitude_vector
        elif isinstance(module, SavedModule):
            for key, tensor in module.trained_module.state_dict(keep_vars=True).items():
                live[f"{PREFIX}{name}.{key}"] = tensor
    return live


def peft_config(
    r: int,
    alpha: float,
    dropout: float,
    target_modules: list[str] | str,
    use_rslora: bool,
    modules_to_save: list[str],
    init: str,
    base_model: str,
    fan_in_fan_out: bool,
    task_type: str,
    use_dora: bool = False,
) -> dict:
    """The `adapter_config.json` contents that PEFT 0.21's `LoraConfig` loads."""
    return {
        "peft_type": "LORA",
        "peft_version": PEFT_VERSION,
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": target_modules,
        "use_rslora": use_rslora,
        "modules_to_save": modules_to_save or None,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "init_lora_weights": True if init == "kaiming" else init,
        "use_dora": use_dora,
        **UNSUPPORTED_PEFT_OPTIONS,
    }


def read_adapter(adapter_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of a LoRA adapter folder; refuses PEFT options tunelab does not implement,
    and checks the fields `lora.options_from_peft_config` reads (a `TunelabError` naming the file
    and the field)."""
    config = read_adapter_config(adapter_dir)
    config_path = Path(adapter_dir) / CONFIG_FILE
    if config.get("peft_type") != "LORA":
        raise TunelabError(f"{config_path}: peft_type is {config.get('peft_type')!r}, not 'LORA'")
    for key in UNSUPPORTED_PEFT_OPTIONS:
        if config.get(key):
            raise TunelabError(f"{config_path}: {key}={config[key]!r} is not supported by tunelab's LoRA")
    if config.get("bias", "none") != "none":
        raise TunelabError(f"{config_path}: bias={config['bias']!r} is not supported; only 'none'")
    init = config.get("init_lora_weights", True)
    if init not in (True, False, "gaussian"):
        raise TunelabError(f"{config_path}: init_lora_weights={init!r} is not supported")
    config_field(config, adapter_dir, "r", "int")
    config_field(config, adapter_dir, "lora_alpha", "number")
    config_field(config, adapter_dir, "lora_dropout", "number", required=False)
    config_field(config, adapter_dir, "target_modules", "str-list")
    config_field(config, adapter_dir, "modules_to_save", "str-list", required=False)
    config_field(config, adapter_dir, "use_rslora", "bool", required=False)
    config_field(config, adapter_dir, "use_dora", "bool", required=False)
    tensors = read_adapter_weights(adapter_dir)
    if config.get("use_dora") and not any(key.endswith(".lora_magnitude_vector") for key in tensors):
        raise TunelabError(
            f"{config_path}: use_dora is true, but {WEIGHTS_FILE} holds no lora_magnitude_vector (DoRA's "
            "magnitudes); a file saved without DoRA loads with use_dora: false"
        )
    return config, tensors

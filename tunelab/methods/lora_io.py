"""LoRA adapter files in PEFT's format, so that PEFT and tunelab read each other's adapters.

A folder holds two files:

- `adapter_config.json`: PEFT's `LoraConfig` as JSON (`peft_type: LORA`, `r`, `lora_alpha`, ...).
- `adapter_model.safetensors`: one tensor per key,
  `base_model.model.<module path>.lora_A.weight` (r, in) and `...lora_B.weight` (out, r) for every
  wrapped layer, and `base_model.model.<module path>.<param>` (e.g. `base_model.model.lm_head.weight`)
  for every module in `modules_to_save`, as PEFT 0.21 writes them (it drops the `.default` adapter
  name and the `modules_to_save.default` level).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tunelab.errors import TunelabError
from tunelab.methods.lora_layer import LoRALinear, SavedModule

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
PEFT_VERSION = "0.21.2"

# PEFT options that change the maths, with the (off) values we write; a file that turns one of them
# on is refused rather than loaded wrongly.
UNSUPPORTED_PEFT_OPTIONS = {
    "use_dora": False,
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


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's key names (see the module docstring), on the CPU."""
    return {key: t.detach().to("cpu").contiguous() for key, t in _adapter_parameters(model).items()}


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
        **UNSUPPORTED_PEFT_OPTIONS,
    }


def write_adapter(out_dir: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write `adapter_config.json` and `adapter_model.safetensors` into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_adapter(adapter_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of a LoRA adapter folder; refuses PEFT options tunelab does not implement."""
    adapter_dir = Path(adapter_dir)
    config_path, weights_path = adapter_dir / CONFIG_FILE, adapter_dir / WEIGHTS_FILE
    if not config_path.exists():
        raise TunelabError(f"{adapter_dir} is not an adapter folder: no {CONFIG_FILE}")
    if not weights_path.exists():
        raise TunelabError(f"{adapter_dir} has no {WEIGHTS_FILE} (tunelab reads safetensors only)")
    config = json.loads(config_path.read_text())
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
    return config, load_file(str(weights_path))


def load_adapter_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy PEFT-named tensors into the wrapped model; every key on either side must match."""
    expected = _adapter_parameters(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise TunelabError(
            f"{source}: adapter weights do not fit the model; "
            f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    with torch.no_grad():
        for key, param in expected.items():
            if tuple(tensors[key].shape) != tuple(param.shape):
                raise TunelabError(
                    f"{source}: {key} has shape {tuple(tensors[key].shape)}, the model wants {tuple(param.shape)}"
                )
            param.copy_(tensors[key])


def _adapter_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT key -> the live tensor it loads into (parameters and buffers of saved modules)."""
    live = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            live[f"{PREFIX}{name}.lora_A.weight"] = module.lora_A.weight
            live[f"{PREFIX}{name}.lora_B.weight"] = module.lora_B.weight
        elif isinstance(module, SavedModule):
            for key, tensor in module.trained_module.state_dict(keep_vars=True).items():
                live[f"{PREFIX}{name}.{key}"] = tensor
    return live

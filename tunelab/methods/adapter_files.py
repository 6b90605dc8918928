"""An adapter folder: the layout PEFT uses, and every adapter method of tunelab saves.

    adapter_config.json          the method's options as JSON, plus `base_model_name_or_path`
    adapter_model.safetensors    only the method's tensors, by name

Which config keys and tensor names a method writes is the method's business (`lora_io`, `adapter`,
`prefix`); this module only writes and reads the two files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tunelab.errors import TunelabError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def write_adapter_folder(out_dir: Path, config: dict, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write `config` (sorted keys) and `tensors` (detached, contiguous, on the CPU) into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    save_file(weights, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def is_adapter_folder(path: Path) -> bool:
    """Does `path` hold an `adapter_config.json`?"""
    return (Path(path) / CONFIG_FILE).is_file()


def read_adapter_config(adapter_dir: Path) -> dict:
    """The parsed `adapter_config.json` of `adapter_dir`; a clear error when there is none."""
    config_path = Path(adapter_dir) / CONFIG_FILE
    if not config_path.is_file():
        raise TunelabError(f"{adapter_dir} is not an adapter folder: no {CONFIG_FILE}")
    return json.loads(config_path.read_text())


def read_adapter_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Name -> tensor from `adapter_model.safetensors` of `adapter_dir` (on the CPU)."""
    weights_path = Path(adapter_dir) / WEIGHTS_FILE
    if not weights_path.is_file():
        raise TunelabError(f"{adapter_dir} has no {WEIGHTS_FILE} (tunelab reads safetensors only)")
    return load_file(str(weights_path))

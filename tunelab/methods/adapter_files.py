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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tunelab.errors import TunelabError, one_line

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
    """The parsed `adapter_config.json` of `adapter_dir`: a `TunelabError` naming the file when there
    is none, or it is not UTF-8 JSON holding an object."""
    config_path = Path(adapter_dir) / CONFIG_FILE
    if not config_path.is_file():
        raise TunelabError(f"{adapter_dir} is not an adapter folder: no {CONFIG_FILE}")
    try:
        config = json.loads(config_path.read_bytes().decode("utf-8"))
    except OSError as err:
        raise TunelabError(f"{config_path}: cannot be read: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise TunelabError(f"{config_path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    except json.JSONDecodeError as err:
        raise TunelabError(
            f"{config_path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
        ) from None
    except (ValueError, RecursionError) as err:  # a huge integer, deep nesting
        raise TunelabError(f"{config_path}: not valid JSON ({type(err).__name__}: {err})") from None
    if not isinstance(config, dict):
        raise TunelabError(f"{config_path}: must hold a JSON object, not a {type(config).__name__}")
    return config


def config_error(adapter_dir: Path, key: str, problem: str) -> TunelabError:
    """The error about field `key` of the `adapter_config.json` in `adapter_dir`."""
    return TunelabError(f"{Path(adapter_dir) / CONFIG_FILE}: {key}: {problem}")


FIELD_KINDS: dict[str, tuple[tuple[type, ...], str]] = {
    "int": ((int,), "an integer"),
    "number": ((int, float), "a number"),
    "str": ((str,), "a string"),
    "bool": ((bool,), "true or false"),
}


def config_field(config: dict, adapter_dir: Path, key: str, kind: str, required: bool = True, default=None):
    """`config[key]`, checked to be of `kind` (int, number, str, bool, or `str-list`: a string or a
    list of strings); a `TunelabError` naming the file and the key when it is missing (and
    `required`) or of another kind. A missing optional key (or null) gives `default`."""
    value = config.get(key)
    if value is None:
        if required:
            raise config_error(adapter_dir, key, "missing")
        return default
    if kind == "str-list":
        ok = isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        what = "a string or a list of strings"
    else:
        types, what = FIELD_KINDS[kind]
        ok = isinstance(value, types) and (kind == "bool" or not isinstance(value, bool))
    if not ok:
        raise config_error(adapter_dir, key, f"must be {what}, not {value!r}")
    return value


def options_from_config(options_cls: type, values: dict, adapter_dir: Path):
    """`options_cls(**values)` (a method's `Options`, from an adapter's config): a bad value is a
    `TunelabError` naming the `adapter_config.json`, not the dataclass's ValueError."""
    try:
        return options_cls(**values)
    except (ValueError, TypeError) as err:
        raise TunelabError(f"{Path(adapter_dir) / CONFIG_FILE}: {err}") from None


def read_adapter_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Name -> tensor from `adapter_model.safetensors` of `adapter_dir` (on the CPU); a file that is
    not safetensors (cut short, empty, something else) is a `TunelabError` naming it."""
    weights_path = Path(adapter_dir) / WEIGHTS_FILE
    if not weights_path.is_file():
        raise TunelabError(f"{adapter_dir} has no {WEIGHTS_FILE} (tunelab reads safetensors only)")
    try:
        return load_file(str(weights_path))
    except (SafetensorError, OSError) as err:
        raise TunelabError(f"{weights_path}: not a readable safetensors file ({one_line(err)})") from None

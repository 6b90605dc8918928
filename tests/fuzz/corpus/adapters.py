"""The `adapter` surface: adapter folders given to eval, generate and merge."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from tests.fuzz.corpus.common import (
    Case,
    Invocation,
    Workspace,
    earlier_run,
    garbage,
    write,
)
from tests.fuzz.corpus.data import (
    FORMATS,
    _mkdir,
    to_jsonl,
)

# ---------------------------------------------------------------- adapter folders


def _edit_json(name: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        data = json.loads((folder / name).read_text())
        change(data)
        (folder / name).write_text(json.dumps(data))

    return mutate


def _config_set(key: str, value) -> Callable[[Path], None]:
    return _edit_json("adapter_config.json", lambda c: c.__setitem__(key, value))


def _config_drop(key: str) -> Callable[[Path], None]:
    return _edit_json("adapter_config.json", lambda c: c.pop(key, None))


def _cut(name: str, keep: Callable[[int], int]) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: keep(len(data))])

    return mutate


def _replace_file(name: str, content: bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_bytes(content)


def _remove(name: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).unlink()


def _edit_tensors(
    change: Callable[[dict], None], name: str = "adapter_model.safetensors"
) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(folder / name)
        change(tensors)
        save_file(tensors, folder / name)

    return mutate


def _first_tensor_shape(tensors: dict) -> None:
    import torch

    tensors[sorted(tensors)[0]] = torch.zeros(3, 3)


def _drop_first_tensor(tensors: dict) -> None:
    tensors.pop(sorted(tensors)[0])


def _extra_tensor(tensors: dict) -> None:
    import torch

    tensors["base_model.model.stray.weight"] = torch.zeros(2)


WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
# (kind, name) -> (mutation of a copy of the adapter folder, the file the error must name: "" for the
# folder, a file name inside it, or an absolute path)
ADAPTER_MUTATIONS: dict[tuple[str, str], tuple[Callable[[Path], None], str | tuple[str, ...]]] = {
    ("lora", "no_adapter_config"): (_remove(CONFIG), ""),
    ("lora", "no_weights"): (_remove(WEIGHTS), ("", WEIGHTS)),
    ("lora", "weights_are_a_folder"): (lambda f: (_remove(WEIGHTS)(f), _mkdir(f / WEIGHTS)), ("", WEIGHTS)),
    ("lora", "weights_truncated"): (_cut(WEIGHTS, lambda n: n // 2), WEIGHTS),
    ("lora", "weights_empty"): (_replace_file(WEIGHTS, b""), WEIGHTS),
    ("lora", "weights_garbage"): (_replace_file(WEIGHTS, garbage(512)), WEIGHTS),
    ("lora", "weights_wrong_shape"): (_edit_tensors(_first_tensor_shape), WEIGHTS),
    ("lora", "weights_missing_tensor"): (_edit_tensors(_drop_first_tensor), WEIGHTS),
    ("lora", "weights_extra_tensor"): (_edit_tensors(_extra_tensor), WEIGHTS),
    ("lora", "config_empty"): (_replace_file(CONFIG, b""), CONFIG),
    ("lora", "config_truncated"): (_cut(CONFIG, lambda n: n // 2), CONFIG),
    ("lora", "config_not_an_object"): (_replace_file(CONFIG, b"[1, 2]"), CONFIG),
    ("lora", "config_invalid_utf8"): (_replace_file(CONFIG, b'{"peft_type": "\xff\xfe"}'), CONFIG),
    ("lora", "base_missing"): (
        _config_set("base_model_name_or_path", "/nonexistent/fuzz-base"),
        "/nonexistent/fuzz-base",
    ),
    ("lora", "base_hub_id_offline"): (
        _config_set("base_model_name_or_path", "nobody/no-such-model"),
        "nobody/no-such-model",
    ),
    ("lora", "base_not_a_string"): (_config_set("base_model_name_or_path", 5), CONFIG),
    ("lora", "base_null"): (_config_set("base_model_name_or_path", None), CONFIG),
    ("lora", "peft_type_unknown"): (_config_set("peft_type", "IA3"), ""),
    ("lora", "peft_type_absent"): (_config_drop("peft_type"), ""),
    ("lora", "tunelab_method_unknown"): (_config_set("tunelab_method", "bogus"), ""),
    ("lora", "r_absent"): (_config_drop("r"), CONFIG),
    ("lora", "r_not_an_integer"): (_config_set("r", "four"), CONFIG),
    ("lora", "target_modules_not_a_list"): (_config_set("target_modules", 5), CONFIG),
    ("lora", "unsupported_option"): (_config_set("use_dora", True), CONFIG),
    ("prefix", "num_layers_absent"): (_config_drop("num_layers"), CONFIG),
    ("prefix", "num_layers_wrong"): (_config_set("num_layers", 999), ""),
    ("prefix", "weights_truncated"): (_cut(WEIGHTS, lambda n: n // 2), WEIGHTS),
    ("prefix", "weights_wrong_shape"): (_edit_tensors(_first_tensor_shape), WEIGHTS),
    ("adapter", "hidden_size_absent"): (_config_drop("hidden_size"), CONFIG),
    ("adapter", "placement_unknown"): (_config_set("placement", "nowhere"), CONFIG),
    ("adapter", "weights_truncated"): (_cut(WEIGHTS, lambda n: n // 2), WEIGHTS),
    ("adapter", "weights_wrong_shape"): (_edit_tensors(_first_tensor_shape), WEIGHTS),
}
ADAPTER_COMMANDS = {
    "lora": ("generate", "eval", "merge"),
    "prefix": ("generate", "eval"),
    "adapter": ("generate", "eval"),
}


def adapter_invocation(ws: Workspace, kind: str, mutate: Callable[[Path], None], named: str, command: str):
    folder = ws.root / "adapter"
    shutil.copytree(ws.runs[kind] / "final", folder)
    mutate(folder)
    names = (str(folder), *named[1:]) if isinstance(named, tuple) else (_adapter_names(folder, named),)
    guarded: tuple[Path, ...] = (folder,)
    if command == "generate":
        argv = ["generate", str(folder), "--prompt", "Reverse the words.", "--max-new-tokens", "2"]
    elif command == "eval":
        data = write(ws.path("data", "eval.jsonl"), to_jsonl(FORMATS["instruction"].valid()))
        argv, guarded = ["eval", str(folder), "--data", str(data), "--no-generate"], (folder, data)
    else:
        out = earlier_run(ws.root / "merged")  # an earlier merge at --out: kept whole
        argv, guarded = ["merge", str(folder), "--out", str(out)], (folder, out)
    return Invocation(argv, names, guarded)


def _adapter_names(folder: Path, named: str) -> str:
    """What an error must hold for `named`: the adapter folder for an empty name, the file in it for
    a bare file name, a path (a base model) as it is. (In the table, ("", FILE) names the folder
    and the file apart, as an error about a missing file does.)"""
    return named if "/" in named else str(folder / named) if named else str(folder)


def adapter_cases() -> list[Case]:
    cases = []
    for (kind, name), (mutate, named) in ADAPTER_MUTATIONS.items():
        for command in ADAPTER_COMMANDS[kind]:
            build = _adapter_build(kind, mutate, named, command)
            cases.append(Case("adapter", f"{kind}/{name}@{command}", build))
    for kind in ("prefix", "adapter"):  # only LoRA merges: said before any file is read
        mutate, _ = ADAPTER_MUTATIONS[(kind, "weights_truncated")]
        cases.append(
            Case("adapter", f"{kind}/weights_truncated@merge", _adapter_build(kind, mutate, "", "merge"))
        )

    def run_folder(ws: Workspace) -> Invocation:
        run = ws.root / "run"
        shutil.copytree(ws.runs["lora"], run)
        (run / "final" / WEIGHTS).unlink()
        return Invocation(["generate", str(run), "--prompt", "hi"], (str(run / "final"), WEIGHTS), (run,))

    cases.append(Case("adapter", "lora/run_folder_without_weights@generate", run_folder))
    return cases


def _adapter_build(kind, mutate, named, command) -> Callable[[Workspace], Invocation]:
    return lambda ws: adapter_invocation(ws, kind, mutate, named, command)

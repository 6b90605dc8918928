"""The `config` surface: run configs and `key=value` overrides."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import yaml

from tests.fuzz.corpus.common import (
    Case,
    Invocation,
    Workspace,
    earlier_run,
    garbage,
    run_config,
    write,
)
from tests.fuzz.corpus.data import (
    FORMATS,
    GRPO,
    _mkdir,
    to_jsonl,
)

# ---------------------------------------------------------------- configs


def _valid_yaml(ws: Workspace, **sections) -> str:
    data = write(ws.path("data", "train.jsonl"), to_jsonl(FORMATS["instruction"].valid()))
    out = earlier_run(ws.root / "earlier-run")
    return yaml.safe_dump(run_config(ws, data, out, **sections), sort_keys=False)


def _yaml_with(**sections) -> Callable[[Workspace], str]:
    return lambda ws: _valid_yaml(ws, **sections)


def _literal(text: bytes | str) -> Callable[[Workspace], bytes | str]:
    return lambda ws: text


def _appended(extra: str) -> Callable[[Workspace], str]:
    return lambda ws: _valid_yaml(ws) + extra


# name -> (the config file's content, strings the error must name besides the file, commands)
BOTH, TRAIN = ("train", "inspect"), ("train",)
CONFIG_FILES: dict[str, tuple[Callable[[Workspace], bytes | str], tuple[str, ...], tuple[str, ...]]] = {
    "yaml_unclosed_flow": (_literal("model: {name_or_path: x\n  bad: [\n"), ("line",), BOTH),
    "yaml_tab_indent": (_literal("model:\n\tname_or_path: x\n"), ("line",), BOTH),
    "yaml_bad_indent": (_literal("model:\n  name_or_path: x\n   dtype: float32\n"), ("line",), BOTH),
    "yaml_nul_byte": (_literal("model: {name_or_path: x}\x00\n"), (), BOTH),
    "yaml_two_documents": (_literal("model: {name_or_path: x}\n---\ntrain: {lr: 1}\n"), (), BOTH),
    "yaml_deep_nesting": (_literal("model: " + "[" * 1000 + "]" * 1000 + "\n"), (), BOTH),
    "invalid_utf8": (_literal(b"model: {name_or_path: \xff\xfe}\n"), (), BOTH),
    "binary_garbage": (lambda ws: garbage(2048), (), BOTH),
    "utf16": (lambda ws: _valid_yaml(ws).encode("utf-16"), (), BOTH),
    "empty_file": (_literal(""), ("model.name_or_path",), BOTH),
    "comments_only": (_literal("# nothing here\n"), ("model.name_or_path",), BOTH),
    "null_document": (_literal("~\n"), ("model.name_or_path",), BOTH),
    "list_document": (_literal("- model\n- data\n"), (), BOTH),
    "scalar_document": (_literal("just some words\n"), (), BOTH),
    "duplicate_key": (_appended("train: {lr: 0.5}\n"), ("train",), ("inspect",)),
    "unknown_top_key": (_appended("bogus: 1\n"), ("'bogus'",), BOTH),
    "integer_key": (_appended("1: 2\n"), (), BOTH),
    "unknown_nested_key": (_yaml_with(train={"learning_rate": 1.0}), ("train.learning_rate",), BOTH),
    "unknown_method_option": (_yaml_with(method={"name": "lora", "rank": 8}), ("method.rank",), BOTH),
    "wrong_type_number": (_yaml_with(train={"lr": "fast"}), ("train.lr",), BOTH),
    "wrong_type_bool": (_yaml_with(train={"progress": "yes"}), ("train.progress",), BOTH),
    "wrong_type_list": (_yaml_with(train={"betas": 0.9}), ("train.betas",), BOTH),
    "wrong_type_string": (_yaml_with(model={"name_or_path": ["a", "b"]}), ("model.name_or_path",), BOTH),
    "section_not_mapping": (_yaml_with(train=5), ("train",), BOTH),
    "method_not_mapping": (_yaml_with(method="lora"), ("method",), BOTH),
    "bad_choice": (_yaml_with(train={"precision": "fp8"}), ("train.precision",), BOTH),
    "negative_lr": (_yaml_with(train={"lr": -1.0}), ("train.lr",), BOTH),
    "max_length_too_small": (_yaml_with(data={"max_length": 2}), ("data.max_length",), BOTH),
    "eval_fraction_over_one": (_yaml_with(data={"eval_fraction": 1.5}), ("data.eval_fraction",), BOTH),
    "unknown_method": (_yaml_with(method={"name": "qlora"}), ("method.name",), BOTH),
    "unknown_objective": (_yaml_with(objective={"name": "rlhf"}), ("objective.name",), BOTH),
    "method_option_bad_value": (_yaml_with(method={"name": "lora", "r": 0}), ("method", "r"), BOTH),
    "objective_option_bad_value": (
        _yaml_with(objective={**GRPO, "num_generations": 1}),
        ("objective", "num_generations"),
        BOTH,
    ),
    # errors about what a valid config names: the error names that, not the config file
    "model_path_missing": (
        _yaml_with(model={"name_or_path": "/nonexistent/fuzz-model"}),
        ("/nonexistent/fuzz-model",),
        TRAIN,
    ),
    "model_hub_id_offline": (
        _yaml_with(model={"name_or_path": "nobody/no-such-model"}),
        ("nobody/no-such-model",),
        TRAIN,
    ),
    "data_file_missing": (
        _yaml_with(data={"train": "/nonexistent/fuzz.jsonl"}),
        ("/nonexistent/fuzz.jsonl",),
        TRAIN,
    ),
    "device_not_present": (_yaml_with(model={"device": "cuda:99"}), ("model.device",), TRAIN),
    "device_not_a_name": (_yaml_with(model={"device": "gpu0"}), ("model.device",), TRAIN),
}
# name -> (overrides after a valid config, strings the error must name)
OVERRIDES: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "override_yaml_error": (["train.lr=["], ("train.lr",)),
    "override_without_equals": (["train.lr"], ("train.lr",)),
    "override_into_a_value": (["train.lr.x=1"], ("train.lr",)),
    "override_unknown_key": (["train.learning_rate=1"], ("train.learning_rate",)),
    "override_wrong_type": (["train.batch_size=two"], ("train.batch_size",)),
    "override_section_to_scalar": (["model=5"], ("model",)),
}


def config_cases() -> list[Case]:
    cases = []
    for name, (content, names, commands) in CONFIG_FILES.items():
        for command in commands:
            cases.append(Case("config", f"{name}@{command}", _config_build(name, content, names, command)))
    for name, (overrides, names) in OVERRIDES.items():
        cases.append(Case("config", f"{name}@train", _override_build(overrides, names)))
    cases += [
        Case("config", "missing_file@train", lambda ws: _path_only("train", ws.root / "nowhere.yaml")),
        Case("config", "missing_file@inspect", lambda ws: _path_only("inspect", ws.root / "nowhere.yaml")),
        Case("config", "folder_not_file@train", lambda ws: _path_only("train", _mkdir(ws.path("run.yaml")))),
        Case("config", "bom@inspect", _accepted_config(lambda ws: "\ufeff" + _valid_yaml(ws))),
        Case("config", "crlf@inspect", _accepted_config(lambda ws: _valid_yaml(ws).replace("\n", "\r\n"))),
    ]
    return cases


NAMED_IN_CONFIG = {
    "model_path_missing",
    "model_hub_id_offline",
    "data_file_missing",
    "device_not_present",
    "device_not_a_name",
}


def _config_build(
    name: str, content, names: tuple[str, ...], command: str
) -> Callable[[Workspace], Invocation]:
    def build(ws: Workspace) -> Invocation:
        cfg = write(ws.path("run.yaml"), content(ws))
        earlier = ws.root / "earlier-run"
        named = names if name in NAMED_IN_CONFIG else (str(cfg), *names)
        return Invocation([command, str(cfg)], named, (cfg, earlier) if earlier.exists() else (cfg,))

    return build


def _override_build(overrides: list[str], names: tuple[str, ...]) -> Callable[[Workspace], Invocation]:
    def build(ws: Workspace) -> Invocation:
        cfg = write(ws.path("run.yaml"), _valid_yaml(ws))
        return Invocation(["train", str(cfg), *overrides], names, (cfg, ws.root / "earlier-run"))

    return build


def _path_only(command: str, path: Path) -> Invocation:
    return Invocation([command, str(path)], (str(path),))


def _accepted_config(content: Callable[[Workspace], str]) -> Callable[[Workspace], Invocation]:
    def build(ws: Workspace) -> Invocation:
        cfg = write(ws.path("run.yaml"), content(ws))
        return Invocation(["inspect", str(cfg)], guarded=(cfg,), accepted=True, says=(r"trainable params",))

    return build

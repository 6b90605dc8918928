"""Reading configs from text: YAML files (strict: duplicate keys, one-line errors naming the file,
line and column) and `key.sub=value` overrides from the command line. `tunelab.config` turns the
mapping into typed dataclasses.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from tunelab.errors import ConfigError


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (["train", "lr"], 1e-4). The value is read as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.load(raw, Loader=StrictLoader) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(
            f"override {text!r}: the value is not valid YAML: {yaml_problem(err, raw)}"
        ) from None
    except RecursionError:
        raise ConfigError(f"override {text!r}: the value is nested too deeply") from None
    if isinstance(value, str) and _looks_like_number(value):
        value = float(value)
    return key.strip().split("."), value


def _looks_like_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set each `key.sub=value` in the nested dict `data` (sections are created as needed)."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
        node[path[-1]] = value
    return data


class StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is an error (PyYAML keeps the
    last value, so a config would silently lose the first)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            lines: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = lines.get(key)
                except TypeError:  # an unhashable key: PyYAML's own error follows
                    continue
                lines[key] = key_node.start_mark.line + 1
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice (first on line {first})", key_node.start_mark
                    )
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 (PyYAML) reads a float only with a dot and a signed exponent, so `lr: 2e-4` or
# `lr: 1.0e5` would be the strings '2e-4' and '1.0e5'. YAML 1.2 and every other config reader
# take them as numbers; so does this one (in config files as in `key.sub=value` overrides).
StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _mark(mark) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


def yaml_problem(err: yaml.YAMLError, text: str = "") -> str:
    """PyYAML's error (several lines, with a caret under the place) as one line: where and what.
    `text`, the YAML read, places an unacceptable character (PyYAML gives its position only)."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem:
        where = f"{_mark(err.problem_mark)}: " if err.problem_mark else ""
        context_at = f" at {_mark(err.context_mark)}" if err.context and err.context_mark else ""
        if err.context and err.problem.startswith("but ") and err.problem_mark:
            # "expected a single document ... but found another document": the context leads
            message = f"{err.context}{context_at}, {err.problem} at {_mark(err.problem_mark)}"
        else:
            message = f"{where}{err.problem}" + (f" ({err.context}{context_at})" if err.context else "")
    elif isinstance(err, yaml.reader.ReaderError):
        before = text[: err.position] if isinstance(err.position, int) else ""
        where = f"line {before.count(chr(10)) + 1}, column {len(before) - before.rfind(chr(10))}: "
        message = f"{where if text else ''}unacceptable character #x{err.character:04x}: {err.reason}"
    else:
        message = str(err)
    return " ".join(message.replace("\t", "\\t").split())


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, with a one-line `ConfigError` naming the file (and the line and column
    where there is one) for a missing or unreadable file, text that is not UTF-8, bad YAML, a key
    given twice, or a document that is not a mapping. An empty document is an empty mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}: not UTF-8 text (line {line}, byte {err.start}: {err.reason}); save the config as UTF-8"
        ) from None
    try:
        data = yaml.load(text, Loader=StrictLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {yaml_problem(err, text)}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not a config: YAML nested too deeply to read") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the config must be a mapping of sections (model:, data:, ...), not a {type(data).__name__}"
        )
    return data

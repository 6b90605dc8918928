"""The package's layout rules (README, "How the code is laid out"), checked on the source itself:
no import cycles, nothing changed in transformers by importing tunelab, short functions, and a
docstring under every option of every method and objective."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.config import field_docs
from tunelab.methods import METHOD_MODULES
from tunelab.objectives import OBJECTIVE_MODULES

PACKAGE = Path(__file__).resolve().parents[2] / "tunelab"
LONGEST_FUNCTION = 60
"""Lines a function may have before its docstring must say why it is one function."""


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    files = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files[name] = path
    return files


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its body (also inside functions: a
    lazy import still ties the two modules together)."""
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tunelab"):
                for alias in node.names:
                    submodule = f"{node.module}.{alias.name}"
                    graph[name].add(submodule if submodule in files else node.module)
            elif isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name.startswith("tunelab"))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for successor in graph[node] & graph.keys():
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_another_in_a_cycle():
    assert cycles(import_graph(module_files())) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_importing_every_module_registers_nothing_in_transformers():
    """Packed attention is registered by `use_packed_attention` (an explicit `register()`), never as
    a side effect of an import: a fresh interpreter imports every module and looks."""
    modules = sorted(
        name for name in module_files() if not name.endswith("__main__")
    )  # that one runs the CLI
    script = (
        "import importlib\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "from transformers import AttentionInterface\n"
        "from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS\n"
        "names = set(AttentionInterface._global_mapping) | set(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping)\n"
        "print(sorted(n for n in names if n.startswith('tunelab')))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    # ... and the explicit call does register them.
    from transformers import AttentionInterface

    from tunelab.kernels.packed_attention import PACKED_ATTENTION, register

    register()
    assert PACKED_ATTENTION in AttentionInterface._global_mapping


def long_functions() -> list[str]:
    """`module.function (N lines)` for every function longer than LONGEST_FUNCTION lines whose
    docstring does not say why it is one function (a paragraph starting `One function:`)."""
    found = []
    for name, path in module_files().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            length = node.end_lineno - node.lineno + 1
            reason = "One function:" in (ast.get_docstring(node) or "")
            if length > LONGEST_FUNCTION and not reason:
                found.append(f"{name}.{node.name} ({length} lines)")
    return found


def test_functions_are_short_or_say_why_not():
    assert long_functions() == []


@pytest.mark.parametrize(
    "module", [*METHOD_MODULES.values(), *OBJECTIVE_MODULES.values()], ids=lambda m: m.rsplit(".", 1)[-1]
)
def test_every_option_has_a_docstring(module):
    """Options of methods and objectives, inherited ones included (PPO and GRPO share theirs)."""
    options = importlib.import_module(module).Options
    documented = field_docs(options)
    missing = [name for name in options.__dataclass_fields__ if name not in documented]
    assert not missing, f"{module}.Options fields without a docstring: {missing}"

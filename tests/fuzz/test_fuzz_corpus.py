"""Issue 21's fuzz corpus (the package tests/fuzz/corpus/) fed to the command line.

Every case runs in this process through `tunelab.cli.main(argv)`, the code path of `tunelab ...`
without the interpreter's start (a few seconds each, too slow for hundreds of cases): `main`
returns the exit status and prints a user error to stderr, and an exception that escapes it is
what a user would see as a traceback. The cases of `SUBPROCESS_CASES`, at least one per surface,
also run as real `python -m tunelab` subprocesses (environment HF_HUB_OFFLINE=1, OMP_NUM_THREADS=1,
TOKENIZERS_PARALLELISM=false), one at a time beside the in-process cases.

For each case: the exit status (2 for a bad input, 0 for an accepted one); a bad input's stderr is
one line, `tunelab COMMAND: error: ...`, naming the file and the place; no traceback anywhere; and
the guarded files (an earlier run's folder, the inputs) are byte for byte what they were.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from fnmatch import fnmatchcase
from pathlib import Path

import pytest

import tunelab
from tests.fuzz.corpus import KNOWN_BUGS, SUBPROCESS_CASES, Case, Invocation, Workspace, all_cases
from tests.helpers import Outcome, run_in_process

CASES = all_cases()
BY_ID = {case.id: case for case in CASES}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def params(cases: list[Case]) -> list:
    """Each case as a pytest parameter; a known bug is a strict xfail."""
    return [
        pytest.param(case, id=case.id, marks=[pytest.mark.xfail(strict=True, reason=f"BUG: {case.bug}")])
        if case.bug
        else pytest.param(case, id=case.id)
        for case in cases
    ]


@pytest.fixture(scope="session")
def fuzz_runs(tmp_path_factory, llama_dir, instruction_data):
    """Trained runs whose files the cases corrupt (in copies): LoRA with checkpoints step-1 and
    step-2 and `final/`; prefix tuning and bottleneck adapters with `final/`."""
    root = tmp_path_factory.mktemp("fuzz-runs")
    methods = {
        "lora": ({"name": "lora", "r": 4}, {"max_steps": 3, "save_every": 1, "keep_last": 2}),
        "prefix": ({"name": "prefix", "num_virtual_tokens": 2}, {"max_steps": 1}),
        "adapter": ({"name": "adapter", "bottleneck": 4}, {"max_steps": 1}),
    }
    runs = {}
    for kind, (method, train) in methods.items():
        config = tunelab.load_config(
            None,
            model={"name_or_path": str(llama_dir)},
            method=method,
            data={
                "train": str(instruction_data[0]),
                "max_records": 8,
                "max_length": 64,
                "template": "alpaca",
            },
            train={"batch_size": 2, "progress": False, "seed": 0, **train},
            eval={"generate": False},
            output_dir=str(root / kind),
        )
        tunelab.train(config)
        runs[kind] = root / kind
    return runs


@pytest.fixture
def workspace(tmp_path, llama_dir, fuzz_runs, monkeypatch) -> Workspace:
    """The case's folder, made the working directory (a relative `output_dir` that slipped through
    lands there). The hub is made offline here as the subprocesses' HF_HUB_OFFLINE=1 makes it:
    huggingface_hub and datasets read that variable once, when imported, and tests/conftest.py
    sets it only after importing them (a hub id would otherwise wait for the network)."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    return Workspace(tmp_path, llama_dir, fuzz_runs)


# ---------------------------------------------------------------- running and checking


def snapshot(paths: tuple[Path, ...]) -> dict[Path, str]:
    """sha256 of every file at or under `paths`."""
    files = {}
    for path in paths:
        found = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in found:
            files[file] = hashlib.sha256(file.read_bytes()).hexdigest()
    return files


def written_over(before: dict[Path, str], after: dict[Path, str], invocation: Invocation) -> list[str]:
    """Guarded files changed, removed or added (but a failed train's `config.yaml` in a guarded
    folder, see `Invocation.rewritable`)."""
    folders = {p for p in invocation.guarded if p.is_dir()}

    def may_change(file: Path) -> bool:
        return file.parent in folders and file.name in invocation.rewritable

    changed = [f"changed {f}" for f, h in before.items() if after.get(f, h) != h and not may_change(f)]
    removed = [f"removed {f}" for f in before if f not in after]
    added = [f"added {f}" for f in after if f not in before and not may_change(f)]
    return changed + removed + added


def run_subprocess(argv: list[str], cwd: Path) -> Outcome:
    result = subprocess.run(
        [sys.executable, "-m", "tunelab", *argv],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=cwd,
        timeout=300,
    )
    return Outcome(result.returncode, result.stdout, result.stderr)


def check(outcome: Outcome, invocation: Invocation, changes: list[str]) -> None:
    shown = f"\n--- stderr:\n{outcome.err[-3000:]}\n--- stdout:\n{outcome.out[-1500:]}"
    assert "Traceback" not in outcome.err + outcome.out, f"a traceback{shown}"
    if invocation.accepted:
        assert outcome.code == 0, f"exit status {outcome.code} for a valid input{shown}"
        for pattern in invocation.says:
            assert re.search(pattern, outcome.out, re.MULTILINE), f"stdout does not say {pattern!r}{shown}"
    else:
        assert outcome.code == 2, f"exit status {outcome.code}, not 2{shown}"
        lines = outcome.err.strip().splitlines()
        assert len(lines) == 1, f"the error is {len(lines)} lines, not one{shown}"
        prefix = f"tunelab {invocation.command}: error: "
        assert lines[0].startswith(prefix), f"the error does not start with {prefix!r}{shown}"
        missing = [name for name in invocation.names if name not in lines[0]]
        assert not missing, f"the error does not name {missing}{shown}"
    assert not changes, f"files written over: {changes}{shown}"


# ---------------------------------------------------------------- the tests


@pytest.mark.parametrize("case", params(CASES))
def test_case_through_main(case: Case, workspace: Workspace, capsys):
    invocation = case.build(workspace)
    before = snapshot(invocation.guarded)
    outcome = run_in_process(invocation.argv, capsys)
    check(outcome, invocation, written_over(before, snapshot(invocation.guarded), invocation))


@pytest.fixture(scope="module", autouse=True)
def subprocess_outcomes(request, tmp_path_factory) -> Iterator[dict[str, Future]]:
    """The selected `SUBPROCESS_CASES`, each built in its own folder and run as `python -m tunelab`:
    case id -> future (invocation, outcome, files written over). They start with the module, one
    at a time in a thread, so that they run on the second core while this process runs the
    in-process cases; their tests come last and wait for them."""
    selected = {
        item.callspec.id
        for item in request.session.items
        if item.originalname == "test_case_through_subprocess"
    }
    prepared = {}
    for case_id in (i for i in SUBPROCESS_CASES if i in selected):
        root = tmp_path_factory.mktemp("fuzz-subprocess")
        material = (request.getfixturevalue("llama_dir"), request.getfixturevalue("fuzz_runs"))
        invocation = BY_ID[case_id].build(Workspace(root, *material))
        prepared[case_id] = (root, invocation, snapshot(invocation.guarded))

    def run(case_id: str) -> tuple:
        root, invocation, before = prepared[case_id]
        outcome = run_subprocess(invocation.argv, root)
        return invocation, outcome, written_over(before, snapshot(invocation.guarded), invocation)

    with ThreadPoolExecutor(max_workers=1) as pool:
        yield {case_id: pool.submit(run, case_id) for case_id in prepared}


@pytest.mark.parametrize("case", params([BY_ID[i] for i in SUBPROCESS_CASES]))
def test_case_through_subprocess(case: Case, subprocess_outcomes):
    invocation, outcome, changes = subprocess_outcomes[case.id].result()
    check(outcome, invocation, changes)


def test_every_surface_has_a_subprocess_case():
    assert {BY_ID[i].surface for i in SUBPROCESS_CASES} == {c.surface for c in CASES}


def test_every_known_bug_names_cases():
    """A `KNOWN_BUGS` pattern that matches no case is stale."""
    stale = [p for p in KNOWN_BUGS if not any(fnmatchcase(c.id, p) for c in CASES)]
    assert not stale, stale


def test_corpus_is_deterministic(tmp_path, llama_dir):
    """Building a case twice writes the same bytes."""
    picks = [c for c in CASES if c.surface in ("data", "config")][::25]
    trees = []
    for attempt in ("a", "b"):
        root = tmp_path / attempt
        for case in picks:
            case.build(Workspace(root / case.id.replace("/", "_"), llama_dir, {}))
        trees.append({p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()})
    assert trees[0].keys() == trees[1].keys()
    differ = [str(p) for p in trees[0] if trees[0][p] != trees[1][p] and not str(p).endswith(".yaml")]
    assert not differ, differ

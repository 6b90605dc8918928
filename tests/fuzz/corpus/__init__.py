"""The fuzz corpus of issue 21: every input surface of the command line, as tables of cases.

A case is a deterministic recipe: `case.build(workspace)` writes its inputs into the workspace's
folder (a test's `tmp_path`) and returns the `Invocation` to run, `tunelab COMMAND ...`, with what
must come of it. For a bad input (most cases) that is: exit status 2, on stderr one line
`tunelab COMMAND: error: ...` holding every string of `names` (the file, and for data the record
and field where the format has them), no traceback, and every file under `guarded` (an earlier
run's folder, the input files) byte for byte as before. An `accepted` case is an input that is
valid however odd it looks (CRLF line ends, a NUL inside a CSV cell, records longer than
`data.max_length`): exit status 0, and its stdout matches every pattern of `says` (for example that
the run reports what it truncated).

Surfaces (`SURFACES`):

- `data`: data files (.jsonl, .json, .csv, .parquet) in each record format with bad records
  (missing fields, wrong types, null, nested junk, empty strings, ...) and bad bytes (invalid
  UTF-8, binary garbage, a NUL byte, truncation, an empty file, a BOM, a huge line, CRLF);
- `config`: run configs (YAML syntax, unknown keys, wrong types, bad values, a missing file, an
  empty file, a list instead of a mapping, binary garbage) and `key=value` overrides;
- `adapter`: adapter folders given to `eval`, `generate` and `merge` with missing or corrupt files;
- `checkpoint`: the latest checkpoint of a run, corrupted, given to `train --resume`;
- `long`: records longer than `data.max_length` (truncated and counted, not errors);
- `eval-set`: evaluation sets that end up empty.

A case's id is `SURFACE/.../NAME@COMMAND`, for example `data/csv/text/bom@eval`. Valid data files
of the SFT formats go to `eval --data` (which reads them as `train` does and says how many records
it read) rather than through a training step; everything else runs as a user would run it.

`KNOWN_BUGS` (in `common.py`) lists the cases tunelab fails today, each with what goes wrong and
where the fix belongs; the tests mark them `xfail(strict=True)`, so a fix shows up as XPASS and its
entry must then be deleted. `python -m tests.fuzz.corpus` prints the number of cases per surface.

The cases live by surface: `data.py`, `configs.py`, `adapters.py`, and `runs.py` (checkpoints,
long records, empty eval sets); `common.py` holds what they share.
"""

from __future__ import annotations

from tests.fuzz.corpus.adapters import adapter_cases
from tests.fuzz.corpus.common import KNOWN_BUGS, SURFACES, Case, Invocation, Workspace
from tests.fuzz.corpus.configs import config_cases
from tests.fuzz.corpus.data import data_cases
from tests.fuzz.corpus.runs import checkpoint_cases, eval_set_cases, long_cases

__all__ = ["KNOWN_BUGS", "SUBPROCESS_CASES", "Case", "Invocation", "Workspace", "all_cases", "counts"]


# ---------------------------------------------------------------- the corpus


def all_cases() -> list[Case]:
    cases = (
        data_cases() + config_cases() + adapter_cases() + checkpoint_cases() + long_cases() + eval_set_cases()
    )
    ids = [c.id for c in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    assert not duplicates, f"duplicate case ids: {duplicates}"
    return cases


def counts(cases: list[Case] | None = None) -> dict[str, int]:
    """Cases per surface."""
    cases = all_cases() if cases is None else cases
    return {surface: sum(c.surface == surface for c in cases) for surface in SURFACES}


# The cases run in a real `python -m tunelab` subprocess as well: at least one per surface.
SUBPROCESS_CASES = (
    "data/jsonl/instruction/truncated@train",
    "config/unknown_nested_key@train",
    "adapter/lora/weights_wrong_shape@generate",
    "checkpoint/other_method_options@train",
    "long/sft_responses_truncated@train",
    "eval-set/held_out_empty_file@train",
)

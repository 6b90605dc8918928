"""Where tunelab's words go. Each kind of output has one channel:

- a command's result (scores, JSON, generated text, the demo's table): `print` to stdout, in the
  command (`tunelab/commands/`), so that it can be piped;
- notes on a run's progress (`[tunelab] model ...`, `[tunelab] resumed from ...`): `note(text)`,
  on the main process only, to stdout through `tqdm.write` so that an open progress bar is not torn;
- progress bars: `progress(...)`, tqdm with tunelab's settings, drawn on the main process only;
- errors a user can fix (a config key, a data record, a path): `TunelabError` (tunelab/errors.py),
  printed by the CLI as one line on stderr without a traceback. A broken invariant inside tunelab
  is a bug: it raises an ordinary exception (`RuntimeError`, `AssertionError`) with its traceback.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch, or the only process."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def note(text: str) -> None:
    """Print a progress note (`[tunelab] ...`) on the main process."""
    if is_main_process():
        tqdm.write(text, file=sys.stdout)
        sys.stdout.flush()


def progress(total: int, desc: str, initial: int = 0, enabled: bool = True) -> tqdm:
    """A progress bar over `total` items (drawn on the main process, when `enabled`)."""
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=not (enabled and is_main_process()),
        dynamic_ncols=True,
    )

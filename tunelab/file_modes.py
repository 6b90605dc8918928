"""Weight files readable by whoever may read the folder's other files.

safetensors 0.8 writes every file through a temporary file created with mode 0600 and renamed into
place, whatever the process's umask (safetensors issue #782); `save_pretrained` writes its weights
the same way. A model folder then holds a `config.json` of mode 0644 (umask 022) beside a
`model.safetensors` only its owner can read: another user, a serving container or a shared cache
finds the folder and fails on the weights. `match_umask(folder)` gives each `.safetensors` file
under `folder` the mode an ordinary new file gets, 0o666 & ~umask.
"""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def match_umask(folder: Path) -> None:
    """chmod every `*.safetensors` under `folder` to 0o666 & ~umask (no-op where that is the mode)."""
    mode = 0o666 & ~current_umask()
    for path in Path(folder).rglob("*.safetensors"):
        if path.stat().st_mode & 0o777 != mode:
            path.chmod(mode)

"""Reading what a finished run recorded about itself (its `config.yaml`)."""

from __future__ import annotations

from pathlib import Path

import yaml

from tunelab.config import DataConfig, build_dataclass


def run_data_config(path: Path) -> DataConfig | None:
    """The `data` section of the run at `path` (a run folder or its `final/`), if it is a run."""
    for folder in (path, path.parent):
        config = folder / "config.yaml"
        if config.is_file() and (folder / "final").exists():
            data = yaml.safe_load(config.read_text()) or {}
            return build_dataclass(DataConfig, data.get("data", {}), "data", str(config))
    return None

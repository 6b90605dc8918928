"""Reading what a finished run recorded about itself (its `config.yaml`)."""

from __future__ import annotations

from pathlib import Path

import yaml

from tunelab.config import DataConfig, RunConfig, build_dataclass, load_config


def run_config_file(path: Path) -> Path | None:
    """The `config.yaml` of the run at `path` (a run folder or its `final/`), if it is a run."""
    for folder in (path, path.parent):
        config = folder / "config.yaml"
        if config.is_file() and (folder / "final").exists():
            return config
    return None


def run_data_config(path: Path) -> DataConfig | None:
    """The `data` section of the run at `path` (a run folder or its `final/`), if it is a run."""
    config = run_config_file(path)
    if config is None:
        return None
    data = yaml.safe_load(config.read_text()) or {}
    return build_dataclass(DataConfig, data.get("data", {}), "data", str(config))


def run_config(path: Path) -> RunConfig | None:
    """The whole resolved config of the run at `path`, if it is a run."""
    config = run_config_file(path)
    return load_config(config) if config is not None else None

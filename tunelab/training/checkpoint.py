"""Checkpoints: written atomically, resumable exactly, never pickled.

`OUTPUT_DIR/checkpoints/step-N/` holds
- `trainable.safetensors`: every trainable parameter by name (float32 where trained in float32);
- `optimizer.safetensors` + `optimizer.json`: the optimizer's per-parameter tensors and its
  hyperparameters (the state dict split into tensors and JSON);
- `rng.safetensors` + `state.json`: torch (CPU and CUDA) RNG states, Python's RNG state, the step
  and the data position (micro-batches consumed);
- `config.yaml`: the run's config.

A checkpoint is written to `step-N.tmp/` and renamed when complete, so a crash mid-write leaves the
previous checkpoints intact; only the last `keep_last` are kept.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tunelab.errors import TunelabError
from tunelab.methods import trainable_parameters

STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state_dict = optimizer.state_dict()
    tensors, meta = {}, {"param_groups": state_dict["param_groups"], "state": {}}
    for index, state in state_dict["state"].items():
        entry = {}
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().contiguous().cpu()
                entry[key] = "__tensor__"
            else:
                entry[key] = value
        meta["state"][str(index)] = entry
    return tensors, meta


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {}
    for index, entry in meta["state"].items():
        state[int(index)] = {
            key: tensors[f"{index}.{key}"] if value == "__tensor__" else value for key, value in entry.items()
        }
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    output_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_position: int,
    config_yaml: str,
    keep_last: int,
    extra_state: dict | None = None,
) -> Path:
    """Write checkpoint `step-N` atomically and prune old ones; returns its folder."""
    root = output_dir / "checkpoints"
    final = root / f"step-{step}"
    tmp = root / f"step-{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    weights = {name: p.detach().contiguous().cpu() for name, p in trainable_parameters(model).items()}
    save_file(weights, tmp / "trainable.safetensors")
    opt_tensors, opt_meta = _optimizer_to_files(optimizer)
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda{i}"] = s
    save_file(rng, tmp / "rng.safetensors")
    state = {
        "step": step,
        "data_position": data_position,
        "python_rng": random.getstate(),
        **(extra_state or {}),
    }
    (tmp / "state.json").write_text(json.dumps(state))
    (tmp / "config.yaml").write_text(config_yaml)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in checkpoint_dirs(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore trainable weights, optimizer and RNG from `path`; return its `state.json`."""
    trainable = trainable_parameters(model)
    weights = load_file(path / "trainable.safetensors")
    missing = sorted(set(trainable) - set(weights))
    unexpected = sorted(set(weights) - set(trainable))
    if missing or unexpected:
        raise TunelabError(
            f"checkpoint {path} does not match the model's trainable parameters "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}): was it made with another method config?"
        )
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(weights[name].to(p.device, p.dtype))
    opt_state = _optimizer_from_files(
        load_file(path / "optimizer.safetensors"), json.loads((path / "optimizer.json").read_text())
    )
    optimizer.load_state_dict(opt_state)
    rng = load_file(path / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
        if states:
            torch.cuda.set_rng_state_all(states)
    state = json.loads((path / "state.json").read_text())
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return state

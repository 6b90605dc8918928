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

Distributed runs (tunelab.training.distributed): `rng.safetensors` and `state.json` also hold every
rank's RNG states. DDP writes the same files. FSDP writes no whole tensor: `trainable.safetensors`
and `optimizer.safetensors` give way to `sharded/`, where every rank writes its own rows with
torch.distributed.checkpoint (tunelab.training.sharded_checkpoint), and `optimizer.json` names the
state by parameter. Such a checkpoint resumes under FSDP on any number of ranks (DCP reshards), and
in one process or under DDP too (each reads whole tensors).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from tunelab.errors import TunelabError, one_line
from tunelab.file_modes import match_umask
from tunelab.methods import trainable_parameters
from tunelab.training.distributed import full_tensor, reshard, shard_like
from tunelab.training.rng import restore_rng, rng_states
from tunelab.training.sharded_checkpoint import SHARDED_DIR, is_sharded_model, load_sharded, save_sharded
from tunelab.weights import load_into

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
                tensors[f"{index}.{key}"] = full_tensor(value).detach().contiguous().cpu()
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


@contextlib.contextmanager
def written(tmp: Path, what: str, kept: str) -> Iterator[None]:
    """Around writing `what` through the folder `tmp`: a failed write (no space, a file-size limit,
    no permission, a vanished folder) removes `tmp` and becomes one `TunelabError` line naming the
    path and the cause and saying what was `kept`; what existed before is never touched."""
    try:
        yield
    except (OSError, SafetensorError) as error:
        shutil.rmtree(tmp, ignore_errors=True)
        cause = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        where = f" ({error.filename})" if isinstance(error, OSError) and error.filename else ""
        raise TunelabError(f"could not write {what}{where}: {cause}; {kept}") from error


def save_checkpoint(
    output_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_position: int,
    config_yaml: str,
    keep_last: int,
    extra_state: dict | None = None,
    is_main: bool = True,
) -> Path:
    """Write checkpoint `step-N` atomically and prune old ones; returns its folder.

    In a distributed run every rank calls this and only the main rank (`is_main`) writes, except
    under FSDP, where every rank writes its shards to `sharded/` (no tensor is gathered)."""
    root = output_dir / "checkpoints"
    final = root / f"step-{step}"
    tmp = root / f"step-{step}.tmp"
    reshard(model)  # FSDP: after an evaluation the root holds its gathered parameters
    if is_sharded_model(model):
        return _save_sharded_checkpoint(
            output_dir, step, model, optimizer, data_position, config_yaml, keep_last, extra_state, is_main
        )
    weights = {
        name: full_tensor(p).detach().contiguous().cpu() for name, p in trainable_parameters(model).items()
    }
    opt_tensors, opt_meta = _optimizer_to_files(optimizer)
    rng, rng_json = rng_states()
    if not is_main:
        return final
    previous = latest_checkpoint(output_dir)
    with written(tmp, f"checkpoint {final}", f"the last checkpoint, {previous or 'none'}, is intact"):
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_file(weights, tmp / "trainable.safetensors")
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        _write_rest(tmp, final, opt_meta, rng, rng_json, step, data_position, config_yaml, extra_state)
    for old in checkpoint_dirs(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_rest(tmp, final, opt_meta, rng, rng_json, step, data_position, config_yaml, extra_state) -> None:
    """The files both formats share (optimizer.json, RNG, state, config), then `tmp` -> `final`."""
    (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
    save_file(rng, tmp / "rng.safetensors")
    state = {"step": step, "data_position": data_position, **rng_json, **(extra_state or {})}
    (tmp / "state.json").write_text(json.dumps(state))
    (tmp / "config.yaml").write_text(config_yaml)
    match_umask(tmp)  # safetensors writes 0600 files
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def _save_sharded_checkpoint(
    output_dir, step, model, optimizer, data_position, config_yaml, keep_last, extra_state, is_main
) -> Path:
    """`save_checkpoint` under FSDP: rank 0 makes `step-N.tmp/`, every rank writes its shards to
    `step-N.tmp/sharded/` (tunelab.training.sharded_checkpoint), rank 0 writes the rest and renames."""
    root = output_dir / "checkpoints"
    final, tmp = root / f"step-{step}", root / f"step-{step}.tmp"
    previous = latest_checkpoint(output_dir)
    kept = f"the last checkpoint, {previous or 'none'}, is intact"
    if is_main:
        with written(tmp, f"checkpoint {final}", kept):
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
    dist.barrier()
    with written(tmp, f"checkpoint {final}", kept):
        opt_meta = save_sharded(tmp, model, optimizer)  # collective: returns once every rank wrote
    rng, rng_json = rng_states()
    if not is_main:
        return final
    with written(tmp, f"checkpoint {final}", kept):
        _write_rest(tmp, final, opt_meta, rng, rng_json, step, data_position, config_yaml, extra_state)
    for old in checkpoint_dirs(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _broken(path: Path, problem: str) -> TunelabError:
    """The error about checkpoint file `path` (or folder): what is wrong, and the way out."""
    return TunelabError(
        f"checkpoint {path}: {problem}; delete the checkpoint folder to resume from the one before"
    )


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise _broken(path, "missing (the checkpoint is incomplete)")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise _broken(path, f"not a readable safetensors file ({one_line(error)})") from None


def _read_json(path: Path):
    if not path.is_file():
        raise _broken(path, "missing (the checkpoint is incomplete)")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except OSError as error:
        raise _broken(path, f"cannot be read ({error.strerror or error})") from None
    except UnicodeDecodeError as error:
        raise _broken(path, f"not UTF-8 text (byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise _broken(
            path, f"not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})"
        ) from None
    except (ValueError, RecursionError) as error:
        raise _broken(path, f"not valid JSON ({type(error).__name__})") from None


def read_state(path: Path) -> dict:
    """The checked `state.json` of checkpoint folder `path`: an object with an integer `step` >= 0
    and an integer `data_position` >= 0; else a `TunelabError` naming the file."""
    state_path = path / "state.json"
    state = _read_json(state_path)
    if not isinstance(state, dict):
        raise _broken(state_path, f"must hold a JSON object, not a {type(state).__name__}")
    for key in ("step", "data_position"):
        value = state.get(key)
        if value is None:
            raise _broken(state_path, f"no {key!r}")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise _broken(state_path, f"{key!r} must be an integer >= 0, not {value!r}")
    return state


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore trainable weights, optimizer and RNG from `path`; return its `state.json`.

    Every file is read and checked before anything is restored: a missing, cut-short or unreadable
    file, or a `state.json` without its step, is a `TunelabError` naming the file."""
    state = read_state(path)
    if (path / SHARDED_DIR).is_dir():
        return _load_sharded_checkpoint(path, state, model, optimizer)
    weights_path = path / "trainable.safetensors"
    weights = _read_tensors(weights_path)
    opt_tensors = _read_tensors(path / "optimizer.safetensors")
    meta_path = path / "optimizer.json"
    meta = _read_json(meta_path)
    try:
        opt_state = _optimizer_from_files(opt_tensors, meta)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        problem = f"does not match optimizer.safetensors ({type(error).__name__}: {one_line(error)})"
        raise _broken(meta_path, problem) from None
    rng_path = path / "rng.safetensors"
    rng = _read_tensors(rng_path)
    load_into(
        trainable_parameters(model),
        weights,
        f"checkpoint {weights_path}",
        hint="was it made with another method config?",
        place=shard_like,  # under FSDP: this rank's shard of the whole saved tensor
    )
    # Under FSDP each rank keeps its shard of the per-parameter tensors (exp_avg, ...).
    params = [p for group in optimizer.param_groups for p in group["params"]]
    try:
        for index, entry in opt_state["state"].items():
            for key, value in entry.items():
                if key != "step" and torch.is_tensor(value) and value.shape == params[index].shape:
                    entry[key] = shard_like(value, params[index])
        optimizer.load_state_dict(opt_state)
    except (IndexError, KeyError, ValueError) as error:
        problem = f"does not fit this run's optimizer ({type(error).__name__}: {one_line(error)})"
        raise _broken(meta_path, problem) from None
    _restore_rng(rng_path, rng, state)
    return state


def _restore_rng(rng_path: Path, rng: dict[str, torch.Tensor], state: dict) -> None:
    try:
        restore_rng(rng, state)
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        problem = f"RNG states unusable ({type(error).__name__}: {one_line(error)})"
        raise _broken(rng_path, problem) from None


def _load_sharded_checkpoint(
    path: Path, state: dict, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict:
    """`load_checkpoint` of a checkpoint an FSDP run wrote (`sharded/`): any number of FSDP ranks,
    one process or DDP (tunelab.training.sharded_checkpoint)."""
    meta_path = path / "optimizer.json"
    meta = _read_json(meta_path)
    if not (isinstance(meta, dict) and isinstance(meta.get("state"), dict) and "param_groups" in meta):
        raise _broken(meta_path, "must hold an object with 'state' and 'param_groups'")
    rng_path = path / "rng.safetensors"
    rng = _read_tensors(rng_path)
    opt_state = load_sharded(path, meta, model, optimizer)
    try:
        optimizer.load_state_dict(opt_state)
    except (IndexError, KeyError, ValueError) as error:
        problem = f"does not fit this run's optimizer ({type(error).__name__}: {one_line(error)})"
        raise _broken(meta_path, problem) from None
    _restore_rng(rng_path, rng, state)
    return state

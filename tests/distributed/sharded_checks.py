"""Checks of sharded loading run by worker.py under torchrun (tests/distributed/test_sharded.py,
benchmarks/sharded_load.py): each rank's peak memory once the model is set up and sharded, and
the sharded model's tensors against a whole load."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from tunelab.training.sharded_load import _local


def peak_kib() -> int:
    """This process's peak resident memory so far (VmHWM of /proc/self/status), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def peak_memory(folder: str, config_path: str) -> None:
    """Each rank: the peak before any model is built (everything imported, tokenizer and config
    read: the baseline), then after `setup_run` and `wrap` (the model loaded, sharded under FSDP);
    rank 0 writes every rank's [baseline, peak] (KiB) to `folder/peak-<world>.json`."""
    from transformers import AutoConfig
    from transformers.models.llama import modeling_llama  # noqa: F401  (imported before the baseline)

    from tunelab.config import load_config
    from tunelab.trained import start_tokenizer
    from tunelab.training.setup import setup_run

    config = load_config(config_path)
    tokenizer = start_tokenizer(config)
    AutoConfig.from_pretrained(config.model.name_or_path)
    baseline = peak_kib()
    run = setup_run(config, tokenizer)
    run.dist.wrap(run.model)
    with torch.no_grad():  # read every weight once: a memory-mapped one counts only once touched
        for tensor in run.model.state_dict().values():
            _local(tensor).float().sum()
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, [baseline, peak_kib()])
    if dist.get_rank() == 0:
        (Path(folder) / f"peak-{dist.get_world_size()}.json").write_text(json.dumps(peaks))


def sharded_equals_whole(folder: str, config_path: str, name: str) -> None:
    """The model set up from a skeleton and sharded (each rank reading its rows), gathered on
    rank 0, against the same config loaded whole in one process (`prepare_model` without a
    skeleton): every parameter and buffer by name, equal; rank 0 writes `folder/<name>.json` with
    the tensors that differ and whether the sharded run was read rank by rank."""
    from tunelab.config import load_config
    from tunelab.training.setup import prepare_model, setup_run

    config = load_config(config_path)
    run = setup_run(config)
    read_by_rank = run.dist.sharded_start is not None
    run.dist.wrap(run.model)
    sharded = run.dist.full_state_dict(run.model)
    if dist.get_rank() == 0:
        whole, _, _, _ = prepare_model(load_config(config_path), torch.device("cpu"))
        reference = whole.state_dict()
        differ = sorted(
            k for k in reference if k not in sharded or not torch.equal(sharded[k], reference[k].detach())
        )
        result = {
            "read_by_rank": read_by_rank,
            "differ": differ,
            "extra": sorted(set(sharded) - set(reference)),
        }
        (Path(folder) / f"{name}.json").write_text(json.dumps(result))

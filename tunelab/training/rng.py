"""RNG states in checkpoints: what a resumed run needs to draw the same random numbers.

One process keeps torch's CPU state, every CUDA device's and Python's. Under torchrun rank 0 gathers
every rank's states (dropout differs per rank), and a resumed rank takes back its own.
"""

from __future__ import annotations

import random

import torch
import torch.distributed as dist

from tunelab.console import note
from tunelab.training.distributed import rank, world_size


def rng_states() -> tuple[dict[str, torch.Tensor], dict]:
    """The RNG states a checkpoint keeps: (tensors, JSON-able). One process: torch CPU (`torch`),
    every CUDA device (`cuda{i}`) and Python's (`python_rng`). Distributed: rank 0 receives every
    rank's, rank 0's under the same names and rank r's CPU/CUDA states as `rank{r}.torch`,
    `rank{r}.cuda`, Python's as `python_rng_ranks`."""
    if world_size() == 1:
        tensors = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"cuda{i}"] = s
        return tensors, {"python_rng": random.getstate()}
    own = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        own["cuda"] = torch.cuda.get_rng_state()  # this rank's device only
    everyone: list = [None] * world_size()
    dist.all_gather_object(everyone, (own, random.getstate()))
    tensors = {"torch": everyone[0][0]["torch"].clone()}  # read by a single-process resume
    for r, (states, _) in enumerate(everyone):
        tensors.update({f"rank{r}.{key}": value for key, value in states.items()})
    return tensors, {"python_rng": everyone[0][1], "python_rng_ranks": [py for _, py in everyone]}


def cuda_index(key: str) -> int:
    """The device index of a `cuda{i}` key: `cuda10` sorts after `cuda2`."""
    return int(key.removeprefix("cuda"))


def restore_rng(tensors: dict[str, torch.Tensor], state: dict) -> None:
    """Set this process's RNGs from what `rng_states` saved (its own rank's states when present)."""
    r, saved_world = rank(), len(state.get("python_rng_ranks", [None]))
    if saved_world != world_size() and r == 0:
        note(
            f"[tunelab] the checkpoint was written by {saved_world} process(es), this run has {world_size()}: "
            "the data order continues only if batch_size x processes is unchanged",
        )
    if world_size() > 1 and f"rank{r}.torch" in tensors:
        torch.set_rng_state(tensors[f"rank{r}.torch"])
        if f"rank{r}.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors[f"rank{r}.cuda"])
        python_rng = state["python_rng_ranks"][r]
    else:
        torch.set_rng_state(tensors["torch"])
        if torch.cuda.is_available() and world_size() == 1:
            states = [
                tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda")), key=cuda_index)
            ]
            if states:
                torch.cuda.set_rng_state_all(states)
        python_rng = state["python_rng"]
    version, internal, gauss = python_rng
    random.setstate((version, tuple(internal), gauss))

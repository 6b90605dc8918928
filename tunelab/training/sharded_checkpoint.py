"""Sharded checkpoints of FSDP runs, with torch.distributed.checkpoint (DCP), never pickled.

Under FSDP2 each rank holds rows [r c, min((r + 1) c, n)) of every trainable parameter and of its
optimizer state (c = ceil(n / W)). A checkpoint keeps them as they are: every rank writes its own
rows, and no rank gathers a whole tensor. `step-N/sharded/` then holds one safetensors file per
rank (`HuggingFaceStorageWriter` with `save_distributed`); each file's header records, as JSON,
where its rows sit in the whole tensor. Tensor names:

    model.<parameter name>               a trainable parameter
    optimizer.<parameter name>.<key>     its optimizer state (AdamW: exp_avg, exp_avg_sq)

`optimizer.json` holds the rest of the optimizer's state dict: the parameter groups, and per
parameter name its small values (`step`, a scalar tensor, as a number with its dtype).

Reading (`HuggingFaceStorageReader`) rebuilds the layout from those JSON headers alone (DCP's
default reader would unpickle a `.metadata` file; none is written or read here), and DCP copies
into each tensor of the resuming run the part it holds: its rows under W' ranks of FSDP (W' need
not be W: DCP reshards), the whole tensor in one process or under DDP.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from tunelab.errors import TunelabError, one_line
from tunelab.methods import trainable_parameters
from tunelab.training.distributed import is_sharded

SHARDED_DIR = "sharded"
SHARDED = "__sharded__"  # optimizer.json: this state value is a tensor in sharded/


def is_sharded_model(model: nn.Module) -> bool:
    """Whether the trainable parameters of `model` are FSDP2 shards (DTensors)."""
    return any(is_sharded(p) for p in trainable_parameters(model).values())


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    """The optimizer's parameters in the order of its state dict's indices."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def save_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Every rank writes its rows of the trainable parameters and of their optimizer state to
    `folder/sharded/` (collective); returns the JSON part of the optimizer state (`optimizer.json`,
    written by the main rank)."""
    import torch.distributed.checkpoint as dcp

    params = trainable_parameters(model)
    names = {id(p): name for name, p in params.items()}
    tensors = {f"model.{name}": p.detach() for name, p in params.items()}
    state_dict = optimizer.state_dict()
    order = _optimizer_params(optimizer)
    meta = {"param_groups": state_dict["param_groups"], "state": {}}
    for index, state in state_dict["state"].items():
        name = names[id(order[index])]
        entry = {}
        for key, value in state.items():
            if is_sharded(value):
                tensors[f"optimizer.{name}.{key}"] = value.detach()
                entry[key] = SHARDED
            elif torch.is_tensor(value) and value.numel() == 1:
                entry[key] = {"value": value.item(), "dtype": str(value.dtype).removeprefix("torch.")}
            elif torch.is_tensor(value):
                raise TunelabError(
                    f"sharded checkpoint: optimizer state {key!r} of {name} is a whole tensor of shape "
                    f"{list(value.shape)}; only FSDP shards and scalars are supported"
                )
            else:
                entry[key] = value
        meta["state"][name] = entry
    writer = dcp.HuggingFaceStorageWriter(str(folder / SHARDED_DIR), save_distributed=True)
    dcp.save(tensors, storage_writer=writer)
    return meta


def load_sharded(folder: Path, meta: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Read `folder/sharded/` into the trainable parameters (in place: each rank its rows under
    FSDP, whole tensors otherwise) and return the optimizer state dict to load, its tensors read
    the same way. `meta` is the checkpoint's `optimizer.json`. A checkpoint that does not fit the
    model (another method config) is a `TunelabError` naming the folder."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    params = trainable_parameters(model)
    tensors = {f"model.{name}": p.detach() for name, p in params.items()}
    index_of = {id(p): i for i, p in enumerate(_optimizer_params(optimizer))}
    state: dict[int, dict] = {}
    for name, entry in meta["state"].items():
        if name not in params:
            raise TunelabError(
                f"checkpoint {folder}: optimizer state for {name}, which this run does not train; "
                "was it made with another method config?"
            )
        param = params[name]
        values = {}
        for key, value in entry.items():
            if value == SHARDED:
                values[key] = torch.empty_like(param.detach())  # AdamW: the parameter's shape and dtype
                tensors[f"optimizer.{name}.{key}"] = values[key]
            elif isinstance(value, dict) and set(value) == {"value", "dtype"}:
                values[key] = torch.tensor(value["value"], dtype=getattr(torch, value["dtype"]))
            else:
                values[key] = value
        state[index_of[id(param)]] = values
    reader = dcp.HuggingFaceStorageReader(str(folder / SHARDED_DIR))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # One process (no process group): DCP warns that it assumes so; it is what is meant.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(
                tensors, storage_reader=reader, no_dist=not (dist.is_available() and dist.is_initialized())
            )
    except (CheckpointException, RuntimeError, ValueError, KeyError) as error:
        raise TunelabError(
            f"checkpoint {folder / SHARDED_DIR}: does not fit this run ({type(error).__name__}: "
            f"{one_line(error)[:300]}); was it made with another method config? Delete the "
            "checkpoint folder to resume from the one before"
        ) from None
    return {"state": state, "param_groups": meta["param_groups"]}

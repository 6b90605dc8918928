"""Sharded loading under FSDP2: each rank reads only its shard of the base model's weights.

Under `train.strategy: fsdp` with W ranks, the model is built without its weights, made complete
(method, objective heads, frozen reference copies), sharded, and only then filled:

1. Skeleton (`build_skeleton`): `from_config` with every parameter on the meta device (buffers such
   as rotary `inv_freq` are computed on the CPU as usual, they are not in the checkpoint). Each
   base parameter then becomes a *placeholder*: a zero of its dtype expanded to its shape (stride
   0, one element of memory; `Placeholder`). A method therefore sees CPU tensors of the right
   shapes and creates its own parameters (LoRA A and B, DoRA magnitudes, adapters, prefixes; a
   reward or value head) on the CPU with the random draws of one process: the RNG state after the
   skeleton is the one a whole `from_pretrained` leaves (it draws nothing; the skeleton's draws
   are undone). A deep copy of a placeholder (a frozen reference copy, LoRA's `modules_to_save`
   copy) is a placeholder of the same checkpoint tensor.
2. `Parallel.wrap` and `Parallel.frozen_copy` call `ShardedStart.shard`: placeholders become meta
   parameters, `fully_shard` splits every parameter along dim 0, the model is materialised
   (`to_empty`), the tensors that were real (the method's, the heads', the buffers) are copied
   back, and each base tensor's local rows are read from the safetensors files (also through
   `model.safetensors.index.json`) and cast to the configured dtype, tensor by tensor (`read_rows`:
   plain reads in blocks of 4 MiB, no memory map whose pages would stay charged to the rank).
   FSDP2 gives rank r of W the rows [r c, min((r + 1) c, n)) of an n-row tensor, c = ceil(n / W).
3. DoRA magnitudes, m = ||W||_c row by row (computed on a placeholder as 0), are recomputed from the
   loaded rows: an nn.Linear's W (out, in) and m (out,) are split alike, so each rank's rows of m
   are the norms of its rows of W; a Conv1D's W (in, out) is split across the norm, so the squared
   column sums of the local rows are all-reduced first.

A rank's peak memory is then its 1/W of the weights plus one block, never the whole model
(BENCHMARKS.md, "Sharded loading on 1/2/4 gloo ranks"). Sources that are not a plain safetensors
model folder (a .gguf file, an earlier run to chain from, a quantised base, pytorch .bin files,
remote code), and the two method options that need the loaded weights at once (prefix
`init_text`, adapter `train_layer_norms`), are loaded whole as before: `plan` says why in one line.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from tunelab.errors import TunelabError
from tunelab.models import safetensors_files


def model_folder(name: str) -> Path | None:
    """The local folder holding model `name`: the folder itself, or a hub id's snapshot in the local
    Hugging Face cache (nothing is downloaded here); None when there is neither."""
    from tunelab.models import looks_like_local_path

    folder = Path(name).expanduser()
    if folder.is_dir() or looks_like_local_path(name):
        return folder if folder.is_dir() else None
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except (OSError, ValueError):  # not in the cache (LocalEntryNotFoundError), not a hub id
        return None


def fallback_reason(config) -> str | None:
    """Why `config.model` cannot be loaded shard by shard (None: it can). Only a model folder (or a
    hub id already in the local cache) with `config.json` and safetensors weights, in full
    precision, with no remote code, qualifies."""
    from tunelab.export.gguf_in import is_gguf
    from tunelab.trained import is_earlier_run

    model = config.model
    name = model.name_or_path
    if is_gguf(name):
        return "the model is a .gguf file"
    if is_earlier_run(name):
        return "the model is an earlier run (its adapters are merged or applied on a whole load)"
    if model.quantization is not None and model.quantization.bits is not None:
        return f"the base is quantised to {model.quantization.bits} bits as it loads"
    if model.trust_remote_code:
        return "the model uses remote code (model.trust_remote_code)"
    folder = model_folder(name)
    if folder is None:
        return f"{name} is not a local folder nor in the local Hugging Face cache (download it first)"
    if not (folder / "config.json").is_file():
        return f"{folder} has no config.json"
    if not safetensors_files(folder):
        return f"{folder} has no model.safetensors or model.safetensors.index.json (pytorch .bin weights)"
    options = config.method.options
    if config.method.name == "prefix" and getattr(options, "init_text", None) is not None:
        return "prefix init_text runs the loaded model to initialise the prefix"
    if config.method.name == "adapter" and getattr(options, "train_layer_norms", False):
        return "adapter train_layer_norms keeps a copy of the loaded norm weights"
    return None


def weight_files(folder: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the safetensors file holding it (`tunelab.models.safetensors_files`:
    one file, or the shards an index names), from each file's header."""
    return {key: file for file in safetensors_files(folder) for key in read_header(file)[1]}


FILE_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
BLOCK_BYTES = 4 * 2**20
"""Rows are read in blocks of at most this many bytes (a larger row is one block)."""


def read_header(file: Path) -> tuple[int, dict]:
    """A safetensors file's layout: (where its data starts, name -> {dtype, shape, data_offsets}).
    The file is 8 bytes (little-endian length N), N bytes of JSON, then the tensors' bytes."""
    with open(file, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        entries = json.loads(handle.read(size))
    entries.pop("__metadata__", None)
    return 8 + size, entries


def read_rows(
    file: Path,
    header: tuple[int, dict],
    key: str,
    shape: torch.Size,
    start: int,
    out: torch.Tensor,
    load_dtype: torch.dtype,
) -> None:
    """Rows [start, start + len(out)) of tensor `key` of a safetensors `file` (row-major: a row is
    prod(shape[1:]) consecutive elements), cast to `load_dtype`, into `out` (on any device). Read
    with plain file reads, block by block: no memory map keeps the file's pages in this process,
    so reading adds at most one block to its memory."""
    data_start, entries = header
    entry = entries[key]
    if list(entry["shape"]) != list(shape):
        raise TunelabError(
            f"{file}: tensor {key} has shape {entry['shape']}, the model expects {list(shape)}"
        )
    if entry["dtype"] not in FILE_DTYPES:
        raise TunelabError(
            f"{file}: tensor {key} has dtype {entry['dtype']}, which sharded loading cannot read"
        )
    dtype = FILE_DTYPES[entry["dtype"]]
    row_shape = list(shape[1:])
    row_bytes = math.prod(row_shape) * dtype.itemsize
    block_rows = max(1, BLOCK_BYTES // max(row_bytes, 1))
    rows = out.shape[0]
    # One buffer per tensor, reused for its blocks (fresh blocks would leave the allocator's heap larger).
    buffer = torch.empty(min(rows, block_rows) * row_bytes, dtype=torch.uint8)
    with open(file, "rb", buffering=0) as handle:
        for first in range(0, rows, block_rows):
            count = min(block_rows, rows - first)
            block = buffer[: count * row_bytes]  # (count * row bytes,)
            handle.seek(data_start + entry["data_offsets"][0] + (start + first) * row_bytes)
            if handle.readinto(block.numpy()) != block.numel():
                raise TunelabError(f"{file}: tensor {key} is cut short (the file is incomplete)")
            values = block.view(dtype).reshape(count, *row_shape)  # (count, ...)
            out[first : first + count].copy_(values.to(load_dtype))


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Within: every parameter a module registers goes to the meta device (no memory, no
    initialisation work); buffers stay real, computed where the module computes them."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


class Placeholder(nn.Parameter):
    """A base parameter of a skeleton: a zero expanded to its shape (stride 0, one element of
    memory) that knows which checkpoint tensor fills it (`key`) and in which dtype that tensor is
    loaded before any later cast (`load_dtype`). A deep copy (a frozen reference copy, LoRA's
    trainable copy of a `modules_to_save` module) is another placeholder of the same tensor, where
    a plain parameter's copy would allocate it whole."""

    key: str
    load_dtype: torch.dtype

    def __deepcopy__(self, memo: dict) -> Placeholder:
        if id(self) not in memo:
            memo[id(self)] = placeholder(
                self.shape, self.dtype, self.requires_grad, self.key, self.load_dtype
            )
        return memo[id(self)]


def placeholder(
    shape: torch.Size, dtype: torch.dtype, requires_grad: bool, key: str, load_dtype: torch.dtype
) -> Placeholder:
    """A `Placeholder` of `shape` and `dtype` for checkpoint tensor `key`, loaded in `load_dtype`."""
    param = Placeholder(torch.zeros((), dtype=dtype).expand(shape), requires_grad=requires_grad)
    param.key, param.load_dtype = key, load_dtype
    return param


def is_placeholder(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is an expanded zero (a placeholder, or one cast to another dtype)."""
    return tensor.numel() > 1 and all(s == 0 for s in tensor.stride())


def cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` in `dtype`; a placeholder stays a placeholder (`.to` would allocate all of it)."""
    if is_placeholder(tensor):
        return torch.zeros((), dtype=dtype).expand(tensor.shape)
    return tensor.to(dtype)


def local_rows(tensor: torch.Tensor, rank: int, world: int) -> tuple[int, int]:
    """The rows [start, stop) of `tensor` (its dim 0) that FSDP2 gives `rank` of `world`:
    chunks of ceil(n / W) rows, the last ones shorter or empty."""
    n = tensor.shape[0]
    chunk = math.ceil(n / world)
    start = min(rank * chunk, n)
    return start, min(start + chunk, n)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (an FSDP2 shard), or the tensor itself."""
    from tunelab.training.distributed import is_sharded

    return tensor.to_local() if is_sharded(tensor) else tensor


@dataclass
class ShardedStart:
    """A skeleton model waiting for its weights: what `shard` needs to fill each rank's shard."""

    folder: Path
    """The model folder the base weights are read from."""
    files: dict[str, Path]
    """Checkpoint tensor name -> safetensors file."""
    device: torch.device
    """This rank's device (where shards are materialised)."""

    def describe(self, world: int) -> str:
        return (
            f"[tunelab] fsdp: each of the {world} ranks reads only its shard of the weights of {self.folder}"
        )

    def shard(self, model: nn.Module, shard_fn: Callable[[nn.Module], None]) -> None:
        """Shard `model` with `shard_fn` (FSDP2) and give each rank its rows of every tensor: the
        base tensors read from the checkpoint, the others (method, heads, buffers) as they were."""
        loaded = {
            name: (p.key, p.load_dtype) for name, p in model.named_parameters() if isinstance(p, Placeholder)
        }
        if not loaded:
            shard_fn(model)
            return
        _placeholders_to_meta(model)
        shard_fn(model)
        kept = {name: _local(t).detach().clone() for name, t in _tensors(model) if not t.is_meta}
        model.to_empty(device=self.device)
        with torch.no_grad():
            for name, tensor in _tensors(model):
                if name in kept:
                    _local(tensor).copy_(kept[name])
            self._read_rows(model, loaded)
            _recompute_dora_magnitudes(model)

    def _read_rows(self, model: nn.Module, loaded: dict[str, tuple[str, torch.dtype]]) -> None:
        """Copy this rank's rows of each checkpoint tensor into the local shard of its parameter."""
        rank, world = dist.get_rank(), dist.get_world_size()
        headers: dict[Path, tuple[int, dict]] = {}
        for name, param in model.named_parameters():
            if name not in loaded:
                continue
            key, load_dtype = loaded[name]
            local = _local(param)
            start, stop = local_rows(param, rank, world)
            if stop - start != local.shape[0]:
                raise TunelabError(
                    f"sharded loading: {name} holds {local.shape[0]} rows on rank {rank}, expected {stop - start}"
                )
            file = self.files[key]
            if file not in headers:
                headers[file] = read_header(file)
            read_rows(file, headers[file], key, param.shape, start, local, load_dtype)


def _tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters()
    yield from model.named_buffers()


def _placeholders_to_meta(model: nn.Module) -> None:
    """Replace every placeholder parameter by a meta parameter of its shape and dtype (tied
    parameters stay one parameter)."""
    meta: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if not isinstance(p, Placeholder):
                continue
            if id(p) not in meta:
                meta[id(p)] = nn.Parameter(
                    torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=p.requires_grad
                )
            module._parameters[name] = meta[id(p)]


def _recompute_dora_magnitudes(model: nn.Module) -> None:
    """DoRA's m = ||W||_c (B = 0 at the start) from the loaded rows: (out,) per wrapped layer."""
    from tunelab.methods.lora_layer import LoRALinear

    rank, world = dist.get_rank(), dist.get_world_size()
    for module in model.modules():
        if not (isinstance(module, LoRALinear) and module.use_dora):
            continue
        magnitude = _local(module.lora_magnitude_vector)  # (rows of out,)
        weight = _local(module.base_layer.weight).to(
            magnitude.dtype
        )  # (rows of out, in) or (rows of in, out)
        if not module.fan_in_fan_out:
            magnitude.copy_(torch.linalg.vector_norm(weight, dim=1))
            continue
        squares = (weight * weight).sum(dim=0)  # (out,): this rank's part of each column's sum
        dist.all_reduce(squares)
        start, stop = local_rows(module.lora_magnitude_vector, rank, world)
        magnitude.copy_(squares[start:stop].sqrt())


def build_skeleton(config, start: ShardedStart) -> nn.Module:
    """The model of `config.model` with placeholders for its base parameters (module docstring),
    registered in `start`; buffers real, generation config and name as `from_pretrained` sets them.
    The random state is left as it was."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from tunelab.models import DTYPES

    folder = start.folder
    model_config = AutoConfig.from_pretrained(folder)
    dtype = DTYPES.get(config.model.dtype)
    if dtype is None:  # `auto`: the checkpoint's own dtype
        saved = getattr(model_config, "dtype", None)
        dtype = saved if isinstance(saved, torch.dtype) else torch.float32
    kwargs = {"dtype": dtype}
    if config.model.attn_implementation:
        kwargs["attn_implementation"] = config.model.attn_implementation
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(model_config, **kwargs)
    torch.set_rng_state(torch_state)
    random.setstate(python_state)
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    model.config._name_or_path = str(config.model.name_or_path)
    model.eval()  # as from_pretrained leaves it
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is None:
                continue
            if id(p) not in made:
                key = _checkpoint_key(names[id(p)], start.files, model)
                made[id(p)] = placeholder(p.shape, p.dtype, p.requires_grad, key, p.dtype)
            module._parameters[attr] = made[id(p)]
    return model


def _checkpoint_key(names: list[str], files: dict[str, Path], model: nn.Module) -> str:
    """The checkpoint's name for a parameter known in the model as `names` (several when tied),
    also across the base-model prefix (`model.` / `transformer.`) that some checkpoints omit."""
    prefix = f"{model.base_model_prefix}."
    for name in names:
        for key in (name, name.removeprefix(prefix), prefix + name):
            if key in files:
                return key
    raise _NotInCheckpoint(names[0])


class _NotInCheckpoint(Exception):
    """A parameter of the skeleton the checkpoint does not name (the whole load then runs)."""


def plan(config, parallel) -> tuple[ShardedStart | None, nn.Module | None, str | None]:
    """Under FSDP with several ranks: (the `ShardedStart`, the skeleton model, the line saying so),
    or (None, None, the line saying why every rank loads the whole model). One process or DDP:
    (None, None, None)."""
    if parallel.world_size == 1 or parallel.strategy != "fsdp":
        return None, None, None
    reason = fallback_reason(config)
    if reason is None:
        folder = model_folder(config.model.name_or_path)
        start = ShardedStart(folder, weight_files(folder), parallel.device or torch.device("cpu"))
        try:
            return start, build_skeleton(config, start), start.describe(parallel.world_size)
        except _NotInCheckpoint as missing:
            reason = f"the checkpoint has no tensor for parameter {missing}"
    return None, None, f"[tunelab] fsdp: every rank loads the whole model ({reason})"

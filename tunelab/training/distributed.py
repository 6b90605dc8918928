"""Data-parallel training on PyTorch's own engine: launched by torchrun, DDP or FSDP2.

DDP: Li et al. 2020, "PyTorch Distributed: Experiences on Accelerating Data Parallel Training".
FSDP: Zhao et al. 2023, "PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel", the
sharding of ZeRO stage 3 (Rajbhandari et al. 2020); FSDP2 shards each parameter as a DTensor.

    torchrun --nproc_per_node=N -m tunelab train run.yaml                     # one machine
    torchrun --nnodes=2 --node_rank=K --nproc_per_node=8 \\
        --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 -m tunelab train run.yaml  # several

torchrun starts the processes and sets `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR/PORT`;
`init` joins them into a process group (NCCL on GPUs, gloo on CPU). Without those variables, or
with one process, nothing here changes the single-device run.

Data. With W ranks and `train.batch_size` b, micro-batch k of the run is the k-th batch of W * b
examples of the seeded order (`tunelab.data.collate.batch_stream`), and rank r takes its rows
r, r + W, r + 2W, ... So W ranks x b see exactly the batches of 1 process x W * b, the order stays
a pure function of (seed, position), and a run resumes at the exact next batch.

Gradient. A step of `grad_accum` micro-batches k on every rank r has the gradient

    g = grad( sum_{r,k} L_sum(r, k) / N ),   N = sum_{r,k} n_units(r, k)

(n_units: target tokens for sft, pairs for reward/dpo). N is all-reduced before the backward
passes. DDP and FSDP average gradients over ranks, (1/W) sum_r g_r, so each rank back-propagates
W * L_sum(r, k) / N and the average is g: 2 ranks x b give the step of 1 process x 2b, up to
floating-point summation order. The logged loss and metrics are all-reduced sums, so rank 0 logs
the global figures.

Strategies (`train.strategy`). `setup_run` joins the process group; the model becomes
data-parallel in `Parallel.wrap`, which each recipe calls once what the objective adds (a reward or
value head, a frozen reference copy) is in place, and before any forward pass of the model (the
held-out figures before training) and the optimizer: under FSDP the weights are read there.
- `ddp` (and `auto`): the model is replicated; `DistributedDataParallel` all-reduces gradients in
  buckets during the backward pass, and not on the micro-batches before the last of a step. The
  loss function runs inside DDP's forward (`Parallel.forward`), so every parameter it touches,
  also outside `model.forward` (the chunked LM head, a reward head), is seen by DDP.
- `fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`) shards every decoder layer and then the
  root, so parameters, gradients and optimizer state are split over ranks (frozen base weights
  too; trainable and frozen parameters may share a layer). With `train.precision` bf16/fp16 a
  `MixedPrecisionPolicy` gathers parameters in that dtype and reduces gradients in float32.
  No rank holds the whole model (tunelab/training/sharded_load.py): the model is built without
  its weights (placeholders; the method's and the objective's tensors are made as in one process),
  and `wrap` / `frozen_copy` shard it, then each rank reads only its rows of each base tensor from
  the safetensors files. A source that is not a plain safetensors folder (a .gguf file, an earlier
  run, a quantised base, .bin weights) is loaded whole on every rank, with one line saying why.
  Forward passes are collective: every rank evaluates, and `generate` runs with `synced_gpus`
  (ranks finishing early keep stepping).

Checkpoints: DDP writes the single-device format (rank 0). FSDP writes its shards: every rank its
rows of the trainable parameters and optimizer state, with torch.distributed.checkpoint in
safetensors files (tunelab/training/sharded_checkpoint.py, nothing pickled); they resume on any
number of ranks (DCP reshards), or in one process. `final/` has the single-device format: the
trained tensors are gathered one at a time (`full_tensor`) and rank 0, which reloads the base
model on its CPU, writes them; it loads on one device. Each rank's RNG states are kept
(tunelab/training/rng.py; dropout differs per rank: each seeds with `seed + rank` once the model is
wrapped, so with dropout the losses match a single process in distribution only). Every rank
reads (and under FSDP writes) the checkpoint, so with several machines `output_dir` must be on
storage they share.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import os
import random
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from tunelab.errors import TunelabError


def world_size() -> int:
    """Processes in the run (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _LossCall(nn.Module):
    """Holds the model so that DDP can wrap it; `forward(fn, *args)` returns `fn(*args)`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, *args):
        return fn(*args)


@dataclass
class Parallel:
    """Where this process stands in the run, and the collective operations a loop needs.

    The default object is the single process: every method is then the identity or a no-op.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "none"
    """`none` (one process), `ddp` or `fsdp`."""
    device: torch.device | None = None
    """This rank's device (`cuda:LOCAL_RANK` or cpu); None for one process (the config decides)."""
    precision: str = "fp32"
    """`train.precision`: the FSDP2 mixed-precision policy follows it."""
    seed: int = 0
    """`train.seed`: each rank continues with `seed + rank` once the model is wrapped."""
    wrapped: bool = False
    """`wrap` ran: the model is now DDP-wrapped or FSDP-sharded."""
    ddp: nn.Module | None = None
    """The `DistributedDataParallel` wrapper (strategy `ddp`, once `wrap` ran)."""
    sharded_start: object | None = None
    """FSDP: the `tunelab.training.sharded_load.ShardedStart` of a model built without its weights;
    `wrap` and `frozen_copy` shard it and read each rank's rows. None: the model is loaded whole."""
    find_unused_parameters: bool = False
    """DDP: expect trainable parameters that get no gradient in a step (a reward model's LM head;
    DDP then finds them after each forward, at some cost). Set by the objective before `wrap`."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints, logs and writes files."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """Parameters are split over ranks (FSDP, once wrapped): gather them before saving."""
        return self.wrapped and self.strategy == "fsdp"

    # ------------------------------------------------------------ model

    def wrap(self, model: nn.Module) -> None:
        """Make `model` data-parallel, once: a DDP wrapper, or FSDP2 shards (in place). Call it when
        the model is complete (heads attached, reference copies made) and before building the
        optimizer; every recipe does. Then seed each rank with `seed + rank`, so that dropout differs
        per rank. One process, or a second call: does nothing."""
        if self.world_size == 1 or self.wrapped:
            return
        if self.strategy == "ddp":
            cuda = self.device is not None and self.device.type == "cuda"
            self.ddp = nn.parallel.DistributedDataParallel(
                _LossCall(model),
                device_ids=[self.device.index] if cuda else None,
                find_unused_parameters=self.find_unused_parameters,
            )
        else:
            self._shard(model)
        self.wrapped = True
        random.seed(self.seed + self.rank)
        torch.manual_seed(self.seed + self.rank)

    def frozen_copy(self, model: nn.Module) -> nn.Module:
        """A frozen eval-mode copy of `model` (a reference policy), made before `wrap`. Under FSDP
        it is sharded like the model, so that no rank holds a whole second model."""
        if self.wrapped:
            raise RuntimeError("make frozen copies of the model before it is wrapped (run.dist.wrap)")
        twin = copy.deepcopy(model).eval()  # a skeleton's placeholders copy as placeholders
        twin.requires_grad_(False)
        if self.world_size > 1 and self.strategy == "fsdp":
            self._shard(twin)
        return twin

    def _shard(self, model: nn.Module) -> None:
        """FSDP2 shards of `model`; a skeleton's base tensors are then read rank by rank."""

        def shard(module: nn.Module) -> None:
            shard_model(module, self.device or torch.device("cpu"), self.world_size, self.precision)

        if self.sharded_start is not None:
            self.sharded_start.shard(model, shard)
        else:
            shard(model)

    def forward(self, fn, *args):
        """`fn(*args)`, run inside DDP's forward when DDP wraps the model (see the module docstring)."""
        return self.ddp(fn, *args) if self.ddp is not None else fn(*args)

    def grad_sync(self, sync: bool):
        """Context for one micro-batch's forward and backward: with `sync=False` DDP keeps the
        gradients local (the micro-batches before the last of a step). FSDP reduces every time."""
        if self.ddp is not None and not sync:
            return self.ddp.no_sync()
        return contextlib.nullcontext()

    # ------------------------------------------------------------ data and numbers

    def shard(self, indices: list[int]) -> list[int]:
        """This rank's rows of a global batch: `indices[rank::world]`. A rank left without a row
        (a last batch of an epoch smaller than the world) repeats one, as `DistributedSampler` pads."""
        if self.world_size == 1:
            return indices
        return indices[self.rank :: self.world_size] or [indices[self.rank % len(indices)]]

    def even_shard(self, size: int) -> list[int]:
        """This rank's positions in a global batch of `size` rows, the same count on every rank:
        `rank, rank + W, ...`, completed by wrapping around (as `DistributedSampler` pads) when W
        does not divide `size`. The online objectives need equal counts: each rank then runs the
        same number of (collective) forward and backward passes."""
        if self.world_size == 1:
            return list(range(size))
        per_rank = -(-size // self.world_size)
        return [(self.rank + j * self.world_size) % size for j in range(per_rank)]

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over ranks (a new tensor; one process: the tensor itself)."""
        if self.world_size == 1:
            return tensor
        total = tensor.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    def sum(self, *values: float) -> list[float]:
        """Sum each number over ranks (one all-reduce, float64); one process: the numbers unchanged."""
        if self.world_size == 1:
            return list(values)
        device = self.device if self.device is not None and self.device.type == "cuda" else "cpu"
        total = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total.tolist()

    def check_same(self, value, what: str) -> None:
        """Raise if `value` (a small picklable object) differs between ranks."""
        if self.world_size == 1:
            return
        values: list = [None] * self.world_size
        dist.all_gather_object(values, value)
        if any(v != values[0] for v in values):
            raise TunelabError(
                f"{what} differs between ranks ({values[0]!r} on rank 0, {value!r} on rank {self.rank}); "
                "with several machines, output_dir must be on storage they share"
            )

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.world_size > 1:
            dist.barrier()

    # ------------------------------------------------------------ saving

    def full_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """Name -> whole CPU tensor of every parameter and buffer of `module` (a model or a part
        of it, e.g. a reward head) on rank 0; an empty dict on the other ranks, which must call it
        too (FSDP shards are gathered collectively)."""
        if self.sharded:
            reshard(module)
        state = {}
        for name, tensor in module.state_dict(keep_vars=True).items():
            whole = full_tensor(tensor).detach()
            if self.is_main:
                state[name] = whole.contiguous().cpu()
        return state


# ---------------------------------------------------------------- process group


def init(config) -> Parallel:
    """Join the process group torchrun set up (`WORLD_SIZE` > 1), or return the single process.

    `model.device` `auto`/`cuda` give `cuda:LOCAL_RANK` when CUDA is there (backend NCCL); `cpu`
    (or no CUDA) gives the CPU (backend gloo). A process group that already exists (a script that
    called `init_process_group` itself) is used as it is.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 and not (dist.is_available() and dist.is_initialized()):
        return Parallel()
    device, local_rank = config.model.device, int(os.environ.get("LOCAL_RANK", "0"))
    if device in ("auto", "cuda") and torch.cuda.is_available():
        chosen = torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
    elif device in ("auto", "cpu"):
        chosen = torch.device("cpu")
    else:
        raise TunelabError(
            f"model.device={device!r}: under torchrun use auto, cuda (each rank takes cuda:LOCAL_RANK) or cpu"
        )
    if not dist.is_initialized():
        backend = "nccl" if chosen.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=chosen if chosen.type == "cuda" else None)
        atexit.register(_destroy)
    if dist.get_world_size() == 1:
        return Parallel(device=chosen)
    return Parallel(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        strategy="fsdp" if config.train.strategy == "fsdp" else "ddp",
        device=chosen,
        precision=config.train.precision,
        seed=config.train.seed,
    )


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------- FSDP2


def shard_model(model: nn.Module, device: torch.device, size: int, precision: str = "fp32") -> None:
    """FSDP2: `fully_shard` every decoder layer, then the whole model (embeddings, final norm, head,
    method modules outside the layers). The root keeps its parameters gathered between its forward
    and backward, so a loss that calls the LM head after `model.forward` works."""
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:
        raise TunelabError("train.strategy=fsdp needs FSDP2: torch 2.6 or newer") from None

    from tunelab.methods.inject import decoder_layers

    # Hugging Face outputs hold views (hidden_states); our losses never change them in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device.type, (size,))
    if precision == "fp32":
        policy = MixedPrecisionPolicy()
    else:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    try:
        _, layers = decoder_layers(model)
    except TunelabError:
        layers = []
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    # Hugging Face's flag for "parameters are gathered in forward": `generate` then keeps every rank
    # running forward passes until all are done (`synced_gpus`), whatever each rank's prompts.
    model._is_fsdp_managed_module = True


def is_sharded(tensor) -> bool:
    """Whether `tensor` is a DTensor (an FSDP2 shard)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every rank for an FSDP2 shard (a collective: every rank must
    call it, in the same order), the tensor itself otherwise."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` split as `like` is (this rank's shard, as a DTensor) when `like` is sharded; else `full`.

    Every rank holds `full` (read from the same file), so no communication is needed."""
    if not is_sharded(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    full = full.detach().to(device=like.device, dtype=like.dtype)
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 module back to its sharded parameters (after an eval forward, the root
    keeps its gathered ones)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def gather_trainable(model: nn.Module, keep: bool) -> dict[str, torch.Tensor]:
    """Name -> whole CPU tensor of every trainable parameter (collective under FSDP); an empty dict
    where `keep` is false (the other ranks take part in the gathering and drop the result)."""
    from tunelab.methods import trainable_parameters

    reshard(model)
    weights = {}
    for name, p in trainable_parameters(model).items():
        whole = full_tensor(p).detach()
        if keep:
            weights[name] = whole.contiguous().cpu()
    return weights

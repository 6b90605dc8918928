"""Packed attention's native CPU kernel: causal attention within each example, computed in float32,
written in C++ (`cpu_attention.cpp`) and compiled at first use.

For example i with rows c_{i-1} .. c_i - 1, a query head's q (T, D), its key/value head's k, v (T, D)
and scale c, token t gets

    s_tj = c q_t . k_j  (j <= t),   P_tj = exp(s_tj - lse_t),   lse_t = log sum_{j<=t} exp(s_tj),
    out_t = sum_j P_tj v_j

and backward, from dO, recomputes P from the saved lse (nothing of size T^2 is stored):

    d_t = dO_t . out_t,   dS_tj = P_tj (dO_t . v_j - d_t),
    dq_t = c sum_j dS_tj k_j,   dk_j = c sum_t dS_tj q_t,   dv_j = sum_t P_tj dO_t

summing dk and dv over the query heads that share a key/value head.

Element types: q, k, v, the output and the gradients are all float32 or all bf16 (`kernel_dtype`):
bf16 under CPU autocast to bf16, as PyTorch's SDPA (an autocast op) would take them there, or when
q, k and v come in bf16. bf16 values are widened as they are read, every product and sum runs in
float32, and out, dq, dk, dv are rounded once as they are written. Backward saves q, k, v and out in
their dtype (half the bytes of float32 copies in bf16) and reads d_t from the rounded out, as
PyTorch's flash kernels do.

The arithmetic is the per-example flash loop's (`packed_kernels.per_example_sdpa`, float32), arranged
for short examples:
PyTorch's CPU flash kernel works in blocks of 32-64 queries with a matrix-library call per block,
which suits long sequences and stays far below the float32 peak on examples of a few hundred
tokens; the kernel here keeps 8 queries x 32 keys in registers. It is faster than that loop on one
layer's attention over a packed row, forward and backward, and on a whole LoRA training step
(BENCHMARKS.md, "The C++ attention kernel").

It is built by `tunelab.kernels.native` (a C++ compiler and ninja, once per machine; the build is
cached in torch's extensions folder, per CPU type) for head dims 16, 32, 64 and 128. Where it
cannot be built or does not apply, packed attention keeps the per-example SDPA loop
(`kernel_available`).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from tunelab.kernels import native

SOURCE = Path(__file__).with_name("cpu_attention.cpp")
HEAD_DIMS = (16, 32, 64, 128)


@functools.cache
def _extension():
    """The compiled kernel module, or None where it cannot be built (the reason is printed once)."""
    return native.build("tunelab_cpu_attention", SOURCE, "using SDPA")


def build() -> bool:
    """Build (or load the cached build of) the kernel now, rather than in the first training step.
    Returns whether it is available."""
    return _extension() is not None


def kernel_available(query: torch.Tensor, dropout: float) -> bool:
    """Can the native kernel attend for `query` (1, H, N, D): CPU, no dropout, a supported head dim,
    and a kernel that builds here."""
    return (
        query.device.type == "cpu"
        and not dropout
        and query.shape[-1] in HEAD_DIMS
        and _extension() is not None
    )


class _PackedCausalAttention(torch.autograd.Function):
    """q (N, H, D), k/v (N, Hkv, D), contiguous, all float32 or all bf16 -> (N, H, D) in their dtype.
    Saves q, k, v and the output as they are (bf16 stays bf16) and the float32 lse (H, N)."""

    @staticmethod
    def forward(ctx, q, k, v, cu, scale: float):
        out, lse = _extension().forward(q, k, v, cu, scale)  # (N, H, D), (H, N)
        ctx.save_for_backward(q, k, v, out, lse, cu)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu = ctx.saved_tensors
        grad = grad_out.contiguous()  # (N, H, D), in out's dtype
        dq, dk, dv = _extension().backward(q, k, v, out, grad, lse, cu, ctx.scale)
        return dq, dk, dv, None, None


def autocast_bf16() -> bool:
    """Whether CPU autocast to bf16 is on: PyTorch's SDPA, an autocast op, would take q, k, v in bf16."""
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def kernel_dtype(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.dtype:
    """The element type the kernel reads and writes: bf16 under CPU autocast to bf16
    (`autocast_bf16`) or when q, k and v are all bf16; float32 otherwise (the inputs widened)."""
    if autocast_bf16() or query.dtype == key.dtype == value.dtype == torch.bfloat16:
        return torch.bfloat16
    return torch.float32


def check_offsets(cu: torch.Tensor, length: int) -> None:
    """Raise ValueError unless `cu` holds the offsets of examples that tile a row of `length` tokens:
    1-D int32 (as packing makes them) or int64, on the CPU, c_0 = 0 <= c_1 <= ... <= c_B = length.
    The kernel reads rows c_{i-1} .. c_i - 1 without bounds checks: offsets beyond the row would
    read and write outside the tensors."""
    if not isinstance(cu, torch.Tensor) or cu.dtype not in (torch.int32, torch.int64):
        got = cu.dtype if isinstance(cu, torch.Tensor) else type(cu).__name__
        raise ValueError(f"cpu_attention: cu must be an int32 (or int64) tensor, got {got}")
    if cu.dim() != 1 or cu.numel() < 2 or cu.device.type != "cpu":
        raise ValueError(
            f"cpu_attention: cu must be a 1-D CPU tensor (B + 1,), got shape {tuple(cu.shape)} on {cu.device}"
        )
    first, last = int(cu[0]), int(cu[-1])
    if first != 0 or last != length or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(
            "cpu_attention: cu must be non-decreasing offsets from 0 to the sequence length "
            f"{length} (query.shape[2]), got {cu.tolist()}"
        )


def packed_native(query, key, value, cu, scale: float | None) -> torch.Tensor:
    """Attention within each example of a packed row: query (1, H, N, D), key/value (1, Hkv, N, D),
    offsets cu (B + 1,) from 0 to N (`check_offsets`). Returns (1, N, H, D): in bf16 under CPU
    autocast to bf16 (as SDPA would), else in query's dtype."""
    check_offsets(cu, query.shape[2])
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    dtype = kernel_dtype(query, key, value)
    # (N, heads, D); transformers' q, k, v are transposed views of (N, heads, D) rows: no copy
    q, k, v = (t[0].transpose(0, 1).to(dtype).contiguous() for t in (query, key, value))
    out = _PackedCausalAttention.apply(q, k, v, cu.to(torch.int64), scale)
    return (out if autocast_bf16() else out.to(query.dtype)).unsqueeze(0)

"""The kernels behind packed attention: one packed row of B examples, attention within each.

query (1, H, N, D), key/value (1, Hkv, N, D) with H = g * Hkv (grouped-query attention), and
cu = [c_0 = 0, c_1, ..., c_B = N] the examples' offsets. Each kernel computes, for token t of
example i,

    out_t = softmax(q_t K_i^T * scale + causal) V_i,   K_i, V_i = rows c_{i-1} .. c_i - 1,

and returns (1, N, H, D), the layout of transformers' attention functions. Three ways, by device:

- `per_example_sdpa` (CPU): one causal SDPA call per example; costs sum_i T_i^2. On CPU it runs in
  float32, where PyTorch's flash kernel is faster than in bfloat16. Packed attention on CPU takes
  tunelab's C++ kernel first (`cpu_attention.py`, the same float32 arithmetic, a faster step);
  this loop serves where that kernel does not apply or build.
- `varlen_flash` (CUDA, bf16/fp16): torch's FlashAttention varlen kernel
  (`torch.nn.attention.varlen.varlen_attn`, PyTorch >= 2.10), one launch for the whole row. On a
  GPU it is several times the per-example loop's throughput, whose every call of a new length
  makes cuDNN build a new graph (BENCHMARKS.md, the H200 section).
- `masked_sdpa` (CUDA otherwise: float32 without autocast, or a PyTorch without varlen): one SDPA
  call with the (N, N) block-diagonal causal mask; costs N^2 but is one launch, between the two
  others in throughput (BENCHMARKS.md).

The longest example and the mask are computed once per packed batch and reused by every layer
(`_per_batch`): the longest length is the one host-device synchronisation of a forward pass.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F

_BATCH: dict = {}


def _per_batch(cu: torch.Tensor) -> dict:
    """A cache for the packed batch whose offsets are `cu`. It holds `cu` itself, so the identity
    check cannot be fooled by a new tensor at a reused address."""
    if _BATCH.get("cu") is not cu:
        _BATCH.clear()
        _BATCH["cu"] = cu
    return _BATCH


def longest_example(cu: torch.Tensor) -> int:
    """max_i (c_i - c_{i-1}), computed once per batch."""
    cache = _per_batch(cu)
    if "longest" not in cache:
        cache["longest"] = int((cu[1:] - cu[:-1]).max())
    return cache["longest"]


def segment_mask(cu: torch.Tensor, n: int) -> torch.Tensor:
    """(1, 1, N, N) bool: token t may attend to token s iff both lie in the same example and s <= t."""
    cache = _per_batch(cu)
    if "mask" not in cache:
        positions = torch.arange(n, device=cu.device)  # (N,)
        example = torch.searchsorted(cu[1:], positions, right=True)  # (N,) example index of each token
        causal = torch.ones(n, n, dtype=torch.bool, device=cu.device).tril()  # (N, N)
        cache["mask"] = ((example[:, None] == example[None, :]) & causal)[None, None]
    return cache["mask"]


def per_example_sdpa(query, key, value, cu, dropout: float, scale: float | None) -> torch.Tensor:
    """One causal SDPA call per example (float32 on CPU). Returns (1, N, H, D) in query's dtype."""
    sizes = (cu[1:] - cu[:-1]).tolist()
    dtype, device = query.dtype, query.device.type
    if device == "cpu":
        query, key, value = query.float(), key.float(), value.float()
    with torch.autocast(device, enabled=torch.is_autocast_enabled(device) and device != "cpu"):
        outputs = [
            F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, scale=scale, is_causal=True, enable_gqa=True
            )  # (1, H, T_i, D)
            for q, k, v in zip(
                query.split(sizes, dim=2), key.split(sizes, dim=2), value.split(sizes, dim=2), strict=True
            )
        ]
    return torch.cat(outputs, dim=2).to(dtype).transpose(1, 2).contiguous()  # (1, N, H, D)


def _repeat_kv(query, key, value):
    """key/value (1, Hkv, N, D) -> (1, H, N, D), each kv head serving its g query heads."""
    groups = query.shape[1] // key.shape[1]
    if groups == 1:
        return key, value
    return key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)


def masked_sdpa(query, key, value, cu, dropout: float, scale: float | None) -> torch.Tensor:
    """One SDPA call under the block-diagonal causal mask. Returns (1, N, H, D)."""
    key, value = _repeat_kv(query, key, value)  # not every masked kernel takes enable_gqa
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=segment_mask(cu, query.shape[2]), dropout_p=dropout, scale=scale
    )  # (1, H, N, D)
    return out.transpose(1, 2).contiguous()


@functools.cache
def _varlen() -> tuple[Callable, dict, bool] | None:
    """torch's `varlen_attn`, the keywords that make it causal, and whether it takes `enable_gqa`
    (its keywords changed between releases: read once from its signature); None before PyTorch 2.10."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    return varlen_attn, causal, "enable_gqa" in params


def _compute_dtype(query: torch.Tensor) -> torch.dtype:
    """The dtype attention runs in on CUDA: autocast's when it is on, else the query's."""
    return torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else query.dtype


def varlen_available(query: torch.Tensor, dropout: float) -> bool:
    """Can `varlen_flash` run here: CUDA, a half dtype (itself or by autocast), no dropout, and a
    PyTorch that has the kernel."""
    if not query.is_cuda or dropout:
        return False
    return _compute_dtype(query) in (torch.float16, torch.bfloat16) and _varlen() is not None


def varlen_flash(query, key, value, cu, scale: float | None) -> torch.Tensor:
    """FlashAttention over the packed row in one launch. Returns (1, N, H, D) in the half dtype
    (autocast's, as SDPA under autocast would)."""
    varlen_attn, causal, takes_gqa = _varlen()
    dtype = _compute_dtype(query)
    options = {**causal, "enable_gqa": True} if takes_gqa else causal
    if not takes_gqa:
        key, value = _repeat_kv(query, key, value)
    longest = longest_example(cu)
    q, k, v = (t[0].transpose(0, 1).to(dtype) for t in (query, key, value))  # (N, H or Hkv, D)
    out = varlen_attn(q, k, v, cu, cu, longest, longest, scale=scale, **options)  # (N, H, D)
    return out.unsqueeze(0)  # (1, N, H, D)

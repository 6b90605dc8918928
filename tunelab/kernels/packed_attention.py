"""Packed attention: one row of several examples, attention that never crosses an example.

A packed row (`tunelab.data.packing.pack_batch`) carries `cu_seq_lens_q/k`, the examples' offsets
[c_0 = 0, c_1, ..., c_B = N], and token t of example i attends to tokens c_{i-1} .. t only:

    attn(q_t) = softmax(q_t K_i^T / sqrt(d) + causal) V_i,   K_i, V_i = rows c_{i-1}..c_i - 1

`cu_seq_lens_*` are the keywords of FlashAttention's varlen kernels, so on a GPU with
`flash_attention_2` the packed row runs natively. Everywhere else `use_packed_attention(model)`
switches the model to `tunelab_packed`, registered here, which picks a kernel by device: on CPU
tunelab's C++ kernel (`tunelab/kernels/cpu_attention.py`, computing in float32, reading and
writing bf16 under bf16 autocast; causal within each example), or
with `data.native_attention: false` (implementation `tunelab_packed_sdpa`) or where that kernel
cannot be built, SDPA per example (a loop over B slices, each with `is_causal=True`, in float32;
`tunelab/kernels/packed_kernels.py`). Both cost sum_i T_i^2 rather than the N^2 of one
block-diagonal mask (what transformers builds for SDPA from restarting `position_ids` alone). On
CUDA it is torch's FlashAttention varlen kernel in one launch (else one masked SDPA call). Without
`cu_seq_lens_q` (ordinary padded batches, generation) it is plain SDPA. It runs outside
`torch.compile` (the split by lengths is data-dependent).
"""

from __future__ import annotations

import functools

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from tunelab.errors import TunelabError
from tunelab.kernels.cpu_attention import kernel_available, packed_native
from tunelab.kernels.packed_kernels import (
    longest_example,
    masked_sdpa,
    per_example_sdpa,
    varlen_available,
    varlen_flash,
)

PACKED_ATTENTION = "tunelab_packed"
PACKED_ATTENTION_SDPA = "tunelab_packed_sdpa"
FLASH_VARLEN = ("flash_attention_2", "flash_attention_3", "flash_attention_4")


@torch.compiler.disable
def packed_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    native: bool = True,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention per packed example (query (1, H, N, D), key/value (1, Hkv, N, D)); plain SDPA for
    batches that are not packed. Returns (1, N, H, D) like every transformers attention function.
    On CPU, `native` takes tunelab's C++ kernel where it applies."""
    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    if cu_seq_lens is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if query.shape[0] != 1:
        raise RuntimeError(f"packed attention takes one packed row, got a batch of {query.shape[0]}")
    if key.shape[2] != query.shape[2]:  # keys before the row's tokens: a cache, prefix tuning's prefix
        raise TunelabError(
            "data.packing cannot be used with a method that adds keys before the tokens (prefix tuning's "
            "prefix is a key/value cache); turn data.packing off for this method"
        )
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    if window and longest_example(cu_seq_lens) > window:
        raise TunelabError(
            f"data.packing has no sliding window, and an example is longer than the model's {window}; "
            f"set data.max_length to at most {window} or turn data.packing off"
        )
    if query.is_cuda:
        if varlen_available(query, dropout):
            return varlen_flash(query, key, value, cu_seq_lens, scaling), None
        return masked_sdpa(query, key, value, cu_seq_lens, dropout, scaling), None
    if native and kernel_available(query, dropout):
        return packed_native(query, key, value, cu_seq_lens, scaling), None
    return per_example_sdpa(query, key, value, cu_seq_lens, dropout, scaling), None


def packed_sdpa_only_forward(*args, **kwargs) -> tuple[torch.Tensor, None]:
    """`packed_sdpa_forward` without the native CPU kernel (`data.native_attention: false`)."""
    return packed_sdpa_forward(*args, native=False, **kwargs)


def packed_sdpa_mask(*args, **kwargs) -> torch.Tensor | None:
    """SDPA's mask, except none at all without padding, cache, offsets or sliding window: packed
    attention needs no (N, N) mask (transformers would build the block-diagonal one from the
    restarting positions), and an unpadded batch is plain causal attention (`is_causal`)."""
    plain = (
        not args
        and kwargs.get("attention_mask") is None
        and kwargs.get("local_size") is None
        and kwargs.get("q_length") == kwargs.get("kv_length")
        and not kwargs.get("q_offset")
        and not kwargs.get("kv_offset")
    )
    return None if plain else sdpa_mask(*args, **kwargs)


@functools.cache
def register() -> None:
    """Add tunelab's packed attention functions (and their masks) to transformers' registries, once.
    `use_packed_attention` calls it; nothing is registered on import."""
    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, packed_sdpa_mask)
    AttentionInterface.register(PACKED_ATTENTION_SDPA, packed_sdpa_only_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION_SDPA, packed_sdpa_mask)


def unpackable_attention(model: PreTrainedModel) -> str | None:
    """Why `model`'s attention implementation cannot attend within packed examples, or None: packing
    takes a varlen FlashAttention, SDPA or eager (which `use_packed_attention` swaps for its own)."""
    current = model.config._attn_implementation
    if current in (*FLASH_VARLEN, PACKED_ATTENTION, PACKED_ATTENTION_SDPA, "sdpa", "eager"):
        return None
    return f"needs sdpa, eager or flash_attention_2 attention; the model uses {current!r}"


def use_packed_attention(model: PreTrainedModel, native: bool = True) -> str:
    """Make `model` attend within packed examples: keep a varlen FlashAttention, else switch SDPA/eager
    to `tunelab_packed` (or, with `native=False`, to `tunelab_packed_sdpa`, which never takes the C++
    CPU kernel). Returns the attention implementation now in use."""
    register()
    current = model.config._attn_implementation
    if current in FLASH_VARLEN:
        return current
    problem = unpackable_attention(model)
    if problem:
        raise TunelabError(f"data.packing {problem}")
    chosen = PACKED_ATTENTION if native else PACKED_ATTENTION_SDPA
    model.set_attn_implementation(chosen)
    return chosen

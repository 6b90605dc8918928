"""Padding-free packing: the examples of a micro-batch concatenated into one row, with attention
that cannot cross examples.

A padded micro-batch of B examples of lengths T_1..T_B costs B * max_i T_i token slots; packed, it
costs sum_i T_i. The packed row carries, for examples i = 1..B with offsets c_0 = 0,
c_i = c_{i-1} + T_i:

    input_ids    (1, N)   x_1 ++ x_2 ++ ... ++ x_B                         N = c_B
    position_ids (1, N)   0..T_1-1 ++ 0..T_2-1 ++ ...                      (RoPE restarts per example)
    labels       (1, N)   y_i with its first label set to -100              (no loss across a boundary)
    cu_seq_lens_q/k (B+1,) int32 [c_0, ..., c_B]; max_length_q/k = max_i T_i

and the attention of token t of example i sees only tokens c_{i-1} .. t of the same example:

    attn(q_t) = softmax(q_t K_i^T / sqrt(d) + causal) V_i,   K_i, V_i = rows c_{i-1}..c_i - 1

so every example's logits, and hence the summed loss, equal those of the padded batch (up to
floating-point reassociation; `tests/unit/test_packing.py` checks it). The micro-batches keep the
same examples as unpadded ones, so packing changes the cost of a step, not the step.

The attention that keeps examples apart is a model operation: `tunelab.kernels.packed_attention`
(`use_packed_attention(model)` before the first packed batch).
"""

from __future__ import annotations

import torch

from tunelab.data.tokenize import IGNORE_INDEX, TokenizedExample
from tunelab.kernels.packed_attention import FLASH_VARLEN

PACKED_KEYS = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def pack_batch(examples: list[TokenizedExample]) -> dict:
    """One packed row holding `examples` (see the module docstring for the fields)."""
    lengths = [len(e.input_ids) for e in examples]
    input_ids = torch.tensor([t for e in examples for t in e.input_ids]).unsqueeze(0)  # (1, N)
    labels = torch.tensor(
        [label if j > 0 else IGNORE_INDEX for e in examples for j, label in enumerate(e.labels)]
    ).unsqueeze(0)  # (1, N)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)  # (1, N)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)  # (B + 1,)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": max(lengths),
        "max_length_k": max(lengths),
    }


def is_packed(batch: dict) -> bool:
    """Does `batch` come from `pack_batch`?"""
    return "cu_seq_lens_q" in batch


def model_inputs(batch: dict, attn_implementation: str | None = None) -> dict:
    """The keyword arguments a model's forward takes from a padded or a packed batch.

    The integer `max_length_*` go only to FlashAttention, which needs them: elsewhere they would
    make `torch.compile` specialise (and recompile) on every new value."""
    if is_packed(batch):
        keys = PACKED_KEYS if attn_implementation in FLASH_VARLEN else PACKED_KEYS[:3]
        return {"input_ids": batch["input_ids"], **{k: batch[k] for k in keys}}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def real_tokens(batch: dict) -> int:
    """Tokens that are not padding."""
    return int(batch["input_ids"].numel() if is_packed(batch) else batch["attention_mask"].sum())

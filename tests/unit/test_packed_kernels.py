"""The packed-attention kernels agree with each other and with attention written out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from tunelab.data.packing import pack_batch
from tunelab.data.tokenize import TokenizedExample
from tunelab.kernels import packed_kernels as K

SIZES = (5, 9, 1, 7)


def qkv(heads=4, kv_heads=2, dim=8, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(SIZES)

    def make(h):  # (1, h, N, dim)
        return torch.randn(1, h, n, dim, generator=g).to(device, dtype).requires_grad_()

    cu = torch.tensor([0, *SIZES]).cumsum(0).to(torch.int32).to(device)  # (B + 1,)
    return make(heads), make(kv_heads), make(kv_heads), cu


def by_hand(query, key, value, scale):
    """softmax(q K^T * scale + causal) V per example, one head at a time, in float64."""
    q, k, v = (t.detach().double()[0] for t in (query, key, value))  # (H, N, D)
    groups = q.shape[0] // k.shape[0]
    out = torch.empty_like(q)
    start = 0
    for size in SIZES:
        rows = slice(start, start + size)
        for h in range(q.shape[0]):
            scores = q[h, rows] @ k[h // groups, rows].T * scale  # (T, T)
            scores = scores.masked_fill(~torch.ones(size, size, dtype=torch.bool).tril(), -math.inf)
            out[h, rows] = scores.softmax(-1) @ v[h // groups, rows]
        start += size
    return out.transpose(0, 1)[None]  # (1, N, H, D)


def test_segment_mask_is_block_diagonal_and_causal():
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    mask = K.segment_mask(cu, 5)[0, 0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ]


def test_per_batch_cache_follows_the_batch():
    a = torch.tensor([0, 2, 5], dtype=torch.int32)
    b = torch.tensor([0, 4, 5], dtype=torch.int32)
    assert K.longest_example(a) == 3 and K.longest_example(b) == 4 and K.longest_example(a) == 3
    assert K.segment_mask(b, 5)[0, 0, 3].int().tolist() == [1, 1, 1, 1, 0]


@pytest.mark.parametrize("kernel", ["per_example", "masked"])
def test_cpu_kernels_equal_attention_by_hand(kernel):
    query, key, value, cu = qkv()
    scale = 0.3
    fn = K.per_example_sdpa if kernel == "per_example" else K.masked_sdpa
    out = fn(query, key, value, cu, 0.0, scale)  # (1, N, H, D)
    torch.testing.assert_close(out.double(), by_hand(query, key, value, scale), atol=1e-5, rtol=1e-5)


def test_masked_kernel_gradients_equal_per_example():
    grads = []
    for fn in (K.per_example_sdpa, K.masked_sdpa):
        query, key, value, cu = qkv(seed=3)
        weights = torch.randn(1, sum(SIZES), 4, 8, generator=torch.Generator().manual_seed(1))
        (fn(query, key, value, cu, 0.0, None) * weights).sum().backward()
        grads.append([t.grad for t in (query, key, value)])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_varlen_needs_cuda_and_a_half_dtype():
    query = torch.zeros(1, 2, 3, 4)
    assert not K.varlen_available(query, 0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_kernels_equal_attention_by_hand(dtype):
    """bf16 takes FlashAttention varlen (where torch has it); float32 under bf16 autocast too;
    float32 without autocast takes the masked SDPA call."""
    query, key, value, cu = qkv(dtype=dtype, device="cuda")
    reference = by_hand(query, key, value, 0.25).to("cuda")
    with torch.autocast("cuda", torch.bfloat16, enabled=dtype == torch.float32):
        chosen = (
            K.varlen_flash(query, key, value, cu, 0.25)
            if K.varlen_available(query, 0.0)
            else K.masked_sdpa(query, key, value, cu, 0.0, 0.25)
        )
    torch.testing.assert_close(chosen.double(), reference, atol=3e-2, rtol=3e-2)
    plain = K.masked_sdpa(query.float(), key.float(), value.float(), cu, 0.0, 0.25)
    torch.testing.assert_close(plain.double(), reference, atol=1e-4, rtol=1e-4)
    chosen.float().sum().backward()
    assert all(t.grad is not None and t.grad.isfinite().all() for t in (query, key, value))


def test_pack_batch_offsets_feed_the_kernels():
    exs = [TokenizedExample(list(range(1, n + 1)), list(range(1, n + 1))) for n in SIZES]
    cu = pack_batch(exs)["cu_seq_lens_q"]
    assert cu.dtype == torch.int32 and K.longest_example(cu) == max(SIZES)

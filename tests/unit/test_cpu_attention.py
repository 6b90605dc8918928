"""tunelab's C++ CPU attention kernel against PyTorch's SDPA in float64, per example: outputs and the
gradients of q, k and v, over head dims, grouped-query ratios and example lengths around the
kernel's blocks (8 query rows, 32 keys); and the training run it serves."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

import tunelab
from tests.helpers import sft_config
from tunelab.kernels import cpu_attention
from tunelab.kernels.packed_attention import PACKED_ATTENTION, PACKED_ATTENTION_SDPA, packed_sdpa_forward
from tunelab.training.metrics import read_metrics

pytestmark = pytest.mark.skipif(
    shutil.which("ninja") is None or (shutil.which("c++") is None and shutil.which("g++") is None),
    reason="no C++ compiler or ninja to build the kernel (packed attention falls back to SDPA)",
)

LENGTHS = (1, 7, 8, 9, 31, 32, 33, 70)


def packed(heads, kv_heads, dim, lengths=LENGTHS, dtype=torch.float32, seed=0):
    """query (1, H, N, D), key/value (1, Hkv, N, D) as transformers passes them (views of (1, N, h, D)
    layouts), offsets (B + 1,) int32, and an output gradient (1, N, H, D)."""
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)

    def make(h):
        return (2 * torch.randn(1, n, h, dim, generator=g)).to(dtype).transpose(1, 2).requires_grad_()

    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    grad = torch.randn(1, n, heads, dim, generator=g).to(dtype)
    return make(heads), make(kv_heads), make(kv_heads), cu, grad


def reference(query, key, value, cu, grad, scale):
    """PyTorch's SDPA per example in float64: output (1, N, H, D) and the gradients of q, k, v."""
    q, k, v = (t.detach().double().requires_grad_() for t in (query, key, value))
    bounds = cu.tolist()
    outs = [
        F.scaled_dot_product_attention(
            q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True, scale=scale, enable_gqa=True
        )
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    out = torch.cat(outs, dim=2).transpose(1, 2)  # (1, N, H, D)
    out.backward(grad.double())
    return out.detach(), [t.grad for t in (q, k, v)]


@pytest.mark.parametrize("heads, kv_heads, dim", [(4, 2, 16), (4, 4, 32), (8, 4, 64), (4, 1, 128)])
def test_kernel_equals_sdpa_per_example_in_float64(heads, kv_heads, dim):
    query, key, value, cu, grad = packed(heads, kv_heads, dim)
    scale = 0.7 / dim**0.5
    out = cpu_attention.packed_native(query, key, value, cu, scale)  # (1, N, H, D)
    out.backward(grad)
    want, want_grads = reference(query, key, value, cu, grad, scale)
    assert out.shape == want.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-5)
    for got, expected in zip((query.grad, key.grad, value.grad), want_grads, strict=True):
        assert got.shape == expected.shape
        torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-4)


def test_bf16_inputs_come_back_in_bf16_and_close():
    query, key, value, cu, grad = packed(8, 4, 64, dtype=torch.bfloat16, seed=3)
    out = cpu_attention.packed_native(query, key, value, cu, None)
    out.backward(grad)
    want, want_grads = reference(query, key, value, cu, grad, 64**-0.5)
    assert out.dtype == query.grad.dtype == key.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), want, atol=3e-2, rtol=2e-2)
    for got, expected in zip((query.grad, key.grad, value.grad), want_grads, strict=True):
        torch.testing.assert_close(got.double(), expected, atol=6e-2, rtol=3e-2)


def test_packed_attention_takes_the_kernel_where_it_applies():
    query, key, value, cu, _ = packed(4, 2, 16)
    kwargs = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu}
    native, _ = packed_sdpa_forward(None, query, key, value, None, **kwargs)
    sdpa, _ = packed_sdpa_forward(None, query, key, value, None, native=False, **kwargs)
    assert torch.equal(native, cpu_attention.packed_native(query, key, value, cu, None))
    torch.testing.assert_close(native, sdpa, atol=1e-5, rtol=1e-5)
    assert cpu_attention.kernel_available(query, 0.0)
    assert not cpu_attention.kernel_available(query, 0.1)  # dropout: SDPA
    assert not cpu_attention.kernel_available(torch.zeros(1, 2, 3, 8), 0.0)  # head dim 8: SDPA


def test_training_with_the_kernel_matches_sdpa(tiny_model_dirs, instruction_data, tmp_path, capsys):
    """Six LoRA steps, packed, bf16 autocast: the kernel and SDPA give the same losses, and the run
    says which one attended."""
    model_dir = tiny_model_dirs["llama"]
    method = {"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"}
    common = ["data.packing=true", "model.dtype=bfloat16", "train.precision=bf16", "train.max_steps=6"]
    losses = {}
    for native in (True, False):
        out = tmp_path / str(native)
        config = sft_config(
            model_dir, instruction_data[0], out, *common, f"data.native_attention={native}", method=method
        )
        tunelab.train(config)
        losses[native] = [r["loss"] for r in read_metrics(out)]
        said = capsys.readouterr().out
        kernel = (
            f"{PACKED_ATTENTION} (C++ kernel) attention" if native else f"{PACKED_ATTENTION_SDPA} attention"
        )
        assert kernel in said
    assert losses[True] == pytest.approx(losses[False], rel=2e-3)
    assert losses[True][-1] < losses[True][0]

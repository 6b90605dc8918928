"""tunelab's C++ CPU attention kernel against PyTorch's SDPA in float64, per example: outputs and the
gradients of q, k and v, over head dims, grouped-query ratios and example lengths around the
kernel's blocks (8 query rows, 32 keys), with scores spread over thousands (far below its exp's
clamp at -87) and on several threads (conftest sets one); its offsets checked against the row;
and the training run it serves."""

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


def packed(heads, kv_heads, dim, lengths=LENGTHS, dtype=torch.float32, seed=0, qk_std=2.0):
    """query (1, H, N, D), key/value (1, Hkv, N, D) as transformers passes them (views of (1, N, h, D)
    layouts), offsets (B + 1,) int32, and an output gradient (1, N, H, D). Entries are normal with
    std 2 (`qk_std` for query and key: the scores' spread grows as its square)."""
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)

    def make(h, std=2.0):
        return (std * torch.randn(1, n, h, dim, generator=g)).to(dtype).transpose(1, 2).requires_grad_()

    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    grad = torch.randn(1, n, heads, dim, generator=g).to(dtype)
    return make(heads, qk_std), make(kv_heads, qk_std), make(kv_heads), cu, grad


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


@pytest.mark.parametrize("heads, kv_heads, dim", [(8, 4, 64), (4, 1, 128), (4, 2, 16)])
def test_the_bf16_kernel_is_the_float32_kernel_rounded_where_it_writes(heads, kv_heads, dim):
    """bf16 q, k, v are widened as read and every sum runs in float32, so the bf16 kernel's out,
    dq, dk, dv equal the float32 kernel's on the widened inputs, rounded to bf16, bit for bit; lse is
    the same float32. Backward reads d_t = dO . out from the rounded out (given to both)."""
    query, key, value, cu, grad = packed(heads, kv_heads, dim, dtype=torch.bfloat16, seed=5)
    extension, offsets, scale = cpu_attention._extension(), cu.long(), 0.7 / dim**0.5
    q, k, v = (t.detach()[0].transpose(0, 1).contiguous() for t in (query, key, value))  # (N, h, D)
    grad_out = grad[0].contiguous()  # (N, H, D)
    out16, lse16 = extension.forward(q, k, v, offsets, scale)
    out32, lse32 = extension.forward(q.float(), k.float(), v.float(), offsets, scale)
    assert out16.dtype == torch.bfloat16 and lse16.dtype == torch.float32
    assert torch.equal(out16, out32.to(torch.bfloat16)) and torch.equal(lse16, lse32)
    grads16 = extension.backward(q, k, v, out16, grad_out, lse16, offsets, scale)
    wide = (q.float(), k.float(), v.float(), out16.float(), grad_out.float())
    grads32 = extension.backward(*wide, lse32, offsets, scale)
    for got, want in zip(grads16, grads32, strict=True):
        assert got.dtype == torch.bfloat16 and torch.equal(got, want.to(torch.bfloat16))


def test_under_bf16_autocast_it_runs_in_bf16_as_sdpa_would_and_saves_bf16():
    """float32 q, k, v under CPU autocast to bf16 (full fine-tuning's rotary output): the kernel
    takes them rounded to bf16, as SDPA (an autocast op) would, returns bf16 equal to the kernel on
    bf16 inputs, and saves q, k, v and out in bf16 (lse in float32) for backward; the gradients
    reach the float32 leaves in float32."""
    query, key, value, cu, grad = packed(8, 4, 64, seed=6)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = cpu_attention.packed_native(query, key, value, cu, None)
    rounded = (t.detach().to(torch.bfloat16) for t in (query, key, value))
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, cpu_attention.packed_native(*rounded, cu, None))
    floats = [t for t in saved if t.is_floating_point()]
    assert sorted(str(t.dtype) for t in floats) == ["torch.bfloat16"] * 4 + ["torch.float32"]
    assert next(t for t in floats if t.dtype == torch.float32).shape == (8, query.shape[2])  # lse (H, N)
    out.backward(grad.to(torch.bfloat16))
    assert all(t.grad.dtype == torch.float32 and torch.isfinite(t.grad).all() for t in (query, key, value))


@pytest.fixture
def threads():
    """`threads(n)` sets torch's (and so the kernel's) thread count for the test; restored after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def forward_backward(query, key, value, cu, grad, scale):
    """The kernel's output and the gradients of q, k, v (fresh leaves: callable several times)."""
    q, k, v = (t.detach().requires_grad_() for t in (query, key, value))
    out = cpu_attention.packed_native(q, k, v, cu, scale)
    out.backward(grad)
    return out.detach(), [t.grad for t in (q, k, v)]


def causal_score_spread(query, key, cu, scale) -> float:
    """The largest max - min of the scores a query sees (its example's keys up to itself)."""
    q, k = (
        query[0].detach().double(),
        key[0].detach().double().repeat_interleave(query.shape[1] // key.shape[1], 0),
    )
    bounds = cu.tolist()
    spread = 0.0
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        s = scale * q[:, a:b] @ k[:, a:b].transpose(1, 2)  # (H, T, T)
        causal = torch.ones(b - a, b - a, dtype=torch.bool).tril()
        high = s.masked_fill(~causal, -torch.inf).amax(-1)
        low = s.masked_fill(~causal, torch.inf).amin(-1)
        spread = max(spread, float((high - low).max()))
    return spread


def assert_close_in_norm(got, expected, rel):
    """||got - expected|| <= rel ||expected||, and every value finite."""
    assert torch.isfinite(got).all()
    assert torch.linalg.norm(got.double() - expected) <= rel * torch.linalg.norm(expected)


@pytest.mark.parametrize("count", [1, 2])
def test_scores_spread_over_thousands_match_sdpa(threads, count):
    """Query and key entries of std 40: the scores a query sees spread over thousands (the softmax
    is nearly one-hot and exp(s - max) underflows far below the kernel's clamp at -87, where its
    exp would otherwise wrap into the sign and exponent bits), still finite in float32. The
    output and gradients match float64 SDPA per example, on one thread and on two."""
    threads(count)
    query, key, value, cu, grad = packed(4, 2, 64, seed=7, qk_std=40.0)
    scale = 64**-0.5
    assert 3000 < causal_score_spread(query, key, cu, scale) < 1e5
    out, grads = forward_backward(query, key, value, cu, grad, scale)
    want, want_grads = reference(query, key, value, cu, grad, scale)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), want, atol=1e-3, rtol=1e-3)
    for got, expected in zip(grads, want_grads, strict=True):
        assert_close_in_norm(got, expected, rel=1e-3)


def test_several_threads_give_the_one_thread_result(threads):
    """The kernel's tasks (example, key/value head) go to torch's threads: on 2 and 3 threads
    (conftest runs everything else on one) forward and backward give bit for bit what one thread
    gives, and match SDPA."""
    query, key, value, cu, grad = packed(8, 2, 32, lengths=LENGTHS * 3, seed=11)
    scale = 0.7 / 32**0.5
    threads(1)
    one, one_grads = forward_backward(query, key, value, cu, grad, scale)
    for count in (2, 3):
        threads(count)
        out, grads = forward_backward(query, key, value, cu, grad, scale)
        assert torch.equal(out, one), count
        assert all(torch.equal(a, b) for a, b in zip(grads, one_grads, strict=True)), count
    want, want_grads = reference(query, key, value, cu, grad, scale)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-5)
    for got, expected in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-4)


N = sum(LENGTHS)


@pytest.mark.parametrize(
    ("offsets", "problem"),
    [
        (torch.tensor([0.0, 100.0, N]), "int32"),
        (torch.tensor([[0, 100, N]], dtype=torch.int32), "1-D"),
        (torch.tensor([0], dtype=torch.int32), "1-D"),
        (torch.tensor([1, 100, N], dtype=torch.int32), f"from 0 to the sequence length {N}"),
        (torch.tensor([0, 100, 90, N], dtype=torch.int32), "non-decreasing"),
        (torch.tensor([0, 100, N - 1], dtype=torch.int32), f"sequence length {N}"),
        (torch.tensor([0, 100, N + 1], dtype=torch.int32), f"sequence length {N}"),
    ],
    ids=["float", "2-D", "no-example", "not-from-0", "decreasing", "short", "beyond-the-row"],
)
def test_offsets_are_checked_against_the_sequence_length(offsets, problem):
    """Offsets the kernel would read outside the row with (or leave rows unwritten) are refused
    before it runs, with the sequence length in the message."""
    query, key, value, _, _ = packed(4, 2, 16)
    with pytest.raises(ValueError, match=problem):
        cpu_attention.packed_native(query, key, value, offsets, None)


def test_int64_offsets_are_taken_too():
    query, key, value, cu, _ = packed(4, 2, 16)
    with torch.no_grad():
        assert torch.equal(
            cpu_attention.packed_native(query, key, value, cu.long(), None),
            cpu_attention.packed_native(query, key, value, cu, None),
        )


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

"""`tunelab.kernels.cpu_fused`: the C++ RMSNorm and SwiGLU against transformers' own modules, and the
cross-entropy rows against PyTorch's float32 chain and a float64 reference.

The references are the modules themselves (`LlamaRMSNorm`, `silu(gate) * up` as `LlamaMLP` computes
it) run through autograd. In bfloat16 the kernels round where the modules round, so results are
equal except where a float32 sum taken in another order crosses a rounding boundary: the tests
require almost every element to be bit-identical and the rest within one bf16 step. In float32
they agree to float32 rounding. Inputs cover SwiGLU's full 16-lane blocks and a partial last block
(zero-padded) and large magnitudes (the exponential's range).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from tunelab.kernels import cpu_fused

pytestmark = pytest.mark.skipif(not cpu_fused.build(), reason="no C++ compiler to build the kernels")

BF16 = torch.bfloat16


def bf16_step(reference: torch.Tensor) -> torch.Tensor:
    """One bf16 unit in the last place at each element's magnitude."""
    return reference.float().abs().clamp_min(1e-30) * 2.0**-7


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, exact_fraction: float = 0.999) -> None:
    """bf16: >= `exact_fraction` of elements bit-identical, all within one bf16 step; float32: close."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if expected.dtype == BF16:
        same = (actual == expected).float().mean().item()
        assert same >= exact_fraction, f"only {same:.5f} of the elements are identical"
        assert bool(((actual.float() - expected.float()).abs() <= bf16_step(expected)).all())
    else:
        torch.testing.assert_close(actual, expected, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize(
    "x_dtype, w_dtype",
    [(BF16, BF16), (torch.float32, torch.float32), (BF16, torch.float32), (torch.float32, BF16)],
)
def test_rms_norm_matches_llama_rms_norm(x_dtype, w_dtype):
    torch.manual_seed(0)
    norm = LlamaRMSNorm(96, eps=1e-5).to(w_dtype)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)  # not the initial ones: the weight's product must be right
    x = (torch.randn(3, 50, 96) * 3).to(x_dtype)
    grad_y = torch.randn(3, 50, 96)

    x_ref = x.clone().requires_grad_()
    y_ref = norm(x_ref)
    y_ref.backward(grad_y.to(y_ref.dtype))
    grad_w_ref, norm.weight.grad = norm.weight.grad, None

    x_fused = x.clone().requires_grad_()
    y_fused = cpu_fused.rms_norm(x_fused, norm.weight, norm.variance_epsilon)
    y_fused.backward(grad_y.to(y_fused.dtype))

    assert_matches(y_fused, y_ref)
    assert_matches(x_fused.grad, x_ref.grad)
    # dw = sum_i dy_i n_i over 150 rows: autograd rounds each product to bf16 before summing, the
    # kernel sums in float32; both must be within rounding of the float64 sum.
    normed = (x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5)).to(x_dtype)
    products = grad_y.to(y_ref.dtype).double() * normed.double()  # (3, 50, 96)
    exact, magnitude = products.sum((0, 1)), products.abs().sum((0, 1))
    bound = magnitude * (2.0**-7 if BF16 in (x_dtype, w_dtype) else 1e-5) + 1e-6
    assert bool(((norm.weight.grad.double() - exact).abs() <= bound).all())
    assert bool(((grad_w_ref.double() - exact).abs() <= bound).all())  # the bound holds for autograd too


def test_rms_norm_without_weight_gradient():
    """A frozen norm (LoRA's base): only dx is computed, and it is the same."""
    torch.manual_seed(1)
    norm = LlamaRMSNorm(64).to(BF16).requires_grad_(False)
    x = torch.randn(40, 64, dtype=BF16)
    x_ref, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    norm(x_ref).sum().backward()
    cpu_fused.rms_norm(x_fused, norm.weight, norm.variance_epsilon).sum().backward()
    assert norm.weight.grad is None
    assert_matches(x_fused.grad, x_ref.grad)


@pytest.mark.parametrize("dtype", [BF16, torch.float32])
@pytest.mark.parametrize("width", [64, 77])  # 77: 5 x 31 x 77 elements end in a partial block
def test_swiglu_matches_silu_times_up(dtype, width):
    torch.manual_seed(2)
    gate = (torch.randn(5, 31, width) * 4).to(dtype)
    gate[0, 0, :6] = torch.tensor([30.0, -30.0, 0.0, 90.0, -90.0, 1e-3])  # the exponential's range
    up = torch.randn(5, 31, width).to(dtype)
    grad = torch.randn(5, 31, width).to(dtype)

    gate_ref, up_ref = gate.clone().requires_grad_(), up.clone().requires_grad_()
    out_ref = torch.nn.functional.silu(gate_ref) * up_ref
    out_ref.backward(grad)
    gate_fused, up_fused = gate.clone().requires_grad_(), up.clone().requires_grad_()
    out_fused = cpu_fused.swiglu(gate_fused, up_fused)
    out_fused.backward(grad)

    assert_matches(out_fused, out_ref)
    assert_matches(up_fused.grad, up_ref.grad)
    assert_matches(gate_fused.grad, gate_ref.grad)


@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_a_nan_stays_in_its_lane(dtype):
    """Comparisons run on 8-lane halves without AVX-512 (vector_math.h, `where_greater`): a NaN in
    either half of a 16-lane block makes its own outputs NaN and no other."""
    gate = torch.linspace(-12.0, 12.0, 48).to(dtype)
    gate[[3, 12, 40]] = float("nan")  # lanes 3 and 12 of the first block, 8 of the third
    up, grad = torch.ones_like(gate), torch.ones_like(gate)
    out = cpu_fused.swiglu_values(gate, up)
    grad_gate, grad_up = cpu_fused._extension().swiglu_backward(grad, gate, up)
    for values in (out, grad_gate, grad_up):
        assert values.isnan().nonzero().flatten().tolist() == [3, 12, 40]
    expected = torch.nn.functional.silu(gate.float()).to(dtype)
    keep = ~gate.isnan()
    assert_matches(out[keep], expected[keep])


def test_kernels_refuse_what_they_cannot_read():
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        cpu_fused.swiglu(torch.ones(4, dtype=torch.float16), torch.ones(4, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="same shape and dtype"):
        cpu_fused.swiglu(torch.ones(4), torch.ones(4, dtype=BF16))
    with pytest.raises(RuntimeError, match="last dim"):
        cpu_fused.rms_norm(torch.ones(3, 5), torch.ones(4), 1e-6)


EXPECTED = {  # architecture -> (RMSNorm modules fused, MLP modules fused) of a 2-layer tiny model
    "llama": (5, 2),
    "qwen2": (5, 2),
    "mistral": (5, 2),
    "phi3": (5, 0),  # its MLP computes gate and up with one fused projection: left as it is
    "gemma": (0, 0),  # x (1 + w), all in float32: not Llama's code
    "gpt2": (0, 0),  # LayerNorm and GELU
}


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_apply_patches_exactly_the_llama_style_modules(arch, tiny_model_dirs):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[arch])
    counts = cpu_fused.apply_fused_kernels(model)
    assert counts == {"norm": EXPECTED[arch][0], "mlp": EXPECTED[arch][1], "loss": 1}  # every head is linear
    assert getattr(model.get_output_embeddings(), cpu_fused.FUSED_LOSS)
    again = cpu_fused.apply_fused_kernels(model)  # applying twice changes nothing
    assert (again["norm"], again["mlp"]) == (0, 0)
    cpu_fused.remove_fused_kernels(model)
    assert not any("forward" in module.__dict__ for module in model.modules())
    assert not any(cpu_fused.FUSED_LOSS in module.__dict__ for module in model.modules())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "phi3"])
def test_a_fused_model_trains_like_the_module_chain(arch, tiny_model_dirs):
    """A bf16 base under bf16 autocast, LoRA-like trainable float32 norms: the loss and every
    gradient of the patched model match the unpatched model's."""
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[arch], dtype=BF16)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.2)
                param.data = param.data.float()  # trained norms: float32 master weights
    ids = torch.randint(3, model.config.vocab_size, (2, 24))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=BF16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {
            n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None
        }

    loss_ref, grads_ref = loss_and_grads()
    cpu_fused.apply_fused_kernels(model)
    loss_fused, grads_fused = loss_and_grads()
    assert grads_fused.keys() == grads_ref.keys()
    torch.testing.assert_close(loss_fused, loss_ref, rtol=1e-3, atol=1e-3)
    for name, grad in grads_ref.items():
        scale = grad.abs().max().item() + 1e-6
        assert (grads_fused[name] - grad).abs().max().item() <= 0.05 * scale, name


def test_a_copied_model_keeps_its_own_fused_forward(llama_dir):
    """Frozen reference copies (DPO, PPO) are deep copies: their patched forwards must run the copy's
    weights, not the original's."""
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    cpu_fused.apply_fused_kernels(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for module in twin.modules():
            if isinstance(module, LlamaRMSNorm):
                module.weight.mul_(2.0)
    norm, twin_norm = model.model.norm, twin.model.norm
    assert twin_norm.forward.__self__ is twin_norm
    x = torch.randn(2, 3, model.config.hidden_size)
    torch.testing.assert_close(twin_norm(x), 2.0 * norm(x))


def test_a_patched_module_falls_back_off_the_kernels_dtypes(llama_dir):
    """float16 (which the kernels do not take) runs the module's own code."""
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float16)
    reference = model.model.norm(torch.ones(2, model.config.hidden_size, dtype=torch.float16))
    cpu_fused.apply_fused_kernels(model)
    fused = model.model.norm(torch.ones(2, model.config.hidden_size, dtype=torch.float16))
    assert torch.equal(fused, reference)


@pytest.mark.parametrize("dtype", [BF16, torch.float32])
@pytest.mark.parametrize("vocab", [49152, 1000, 37])  # 37: two blocks of 16 and a rest of 5
def test_cross_entropy_rows_are_as_exact_as_the_float32_chain(dtype, vocab):
    """Loss lse - z_y and gradient softmax(z) - onehot(y), against float64: no further from it than
    PyTorch's float32 chain (`tunelab.losses.causal_lm`); in bf16 the rounded gradient is the chain's."""
    torch.manual_seed(vocab)
    rows = torch.arange(64)
    logits = (torch.randn(64, vocab) * 4).to(dtype)  # (n, V)
    targets = torch.randint(0, vocab, (64,))
    loss, grad = cpu_fused.cross_entropy_rows(logits, targets, want_grad=True)
    exact_loss = torch.nn.functional.cross_entropy(logits.double(), targets, reduction="none")
    exact_grad = torch.softmax(logits.double(), -1)
    exact_grad[rows, targets] -= 1
    chain_loss = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    chain_grad = torch.softmax(logits, -1, dtype=torch.float32)
    chain_grad[rows, targets] -= 1
    assert loss.dtype == torch.float32 and grad.dtype == dtype and grad.shape == logits.shape
    chain_loss_error = (chain_loss.double() - exact_loss).abs().max().item()
    assert (loss.double() - exact_loss).abs().max().item() <= 2 * chain_loss_error + 1e-6
    if dtype == BF16:
        assert_matches(grad, chain_grad.to(BF16))
    else:
        chain_grad_error = (chain_grad.double() - exact_grad).abs().max().item()
        assert (grad.double() - exact_grad).abs().max().item() <= 2 * chain_grad_error + 1e-7
    assert cpu_fused.cross_entropy_rows(logits, targets, want_grad=False)[1] is None


@pytest.mark.parametrize("dtype", [BF16, torch.float32])
@pytest.mark.parametrize("vocab", [1000, 37])
def test_cross_entropy_rows_in_place_write_the_same_gradient_over_the_logits(dtype, vocab):
    """`in_place=True` (the chunked loss's call: one (n, V) array instead of two): the same loss and
    gradient bit for bit, written over the caller's logits, also where the target is the row's last
    element or falls in the partial block after the last 16 lanes (vocab 37)."""
    torch.manual_seed(vocab + 1)
    logits = (torch.randn(16, vocab) * 4).to(dtype)  # (n, V)
    targets = torch.randint(0, vocab, (16,))
    targets[:3] = torch.tensor([0, vocab - 1, vocab - 2])
    want_loss, want_grad = cpu_fused.cross_entropy_rows(logits.clone(), targets, want_grad=True)
    overwritten = logits.clone()
    loss, grad = cpu_fused.cross_entropy_rows(overwritten, targets, want_grad=True, in_place=True)
    assert grad.data_ptr() == overwritten.data_ptr()
    assert torch.equal(loss, want_loss) and torch.equal(grad, want_grad)
    assert torch.equal(overwritten, want_grad)


def test_cross_entropy_rows_refuse_a_target_outside_the_vocabulary():
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        cpu_fused.cross_entropy_rows(torch.randn(2, 8), torch.tensor([1, 8]), want_grad=True)


@pytest.mark.parametrize("head_trains", [False, True])
def test_the_chunked_loss_with_the_fused_rows_equals_the_chain(llama_dir, head_trains):
    """`chunked_lm_loss_sum` on a marked head (the C++ rows) and on an unmarked one (the chain), bf16
    autocast, chunks of 5 targets: the same loss, and gradients of the hidden states and the head."""
    from tunelab.losses.causal_lm import chunked_lm_loss_sum

    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    head = model.get_output_embeddings()
    head.weight.requires_grad_(head_trains)
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, model.config.hidden_size, requires_grad=True)  # (B, T, H)
    labels = torch.randint(0, model.config.vocab_size, (2, 9))
    labels[0, :3] = -100  # prompt positions carry no loss

    def loss_and_grads(marked: bool):
        cpu_fused.remove_fused_kernels(model)
        if marked:
            cpu_fused.apply_fused_kernels(model)
        hidden.grad, head.weight.grad = None, None
        with torch.autocast("cpu", dtype=BF16):
            loss = chunked_lm_loss_sum(hidden, head, labels, chunk_size=5)
        loss.backward()
        return loss.detach(), hidden.grad.clone(), head.weight.grad

    loss, grad_h, grad_w = loss_and_grads(marked=True)
    chain_loss, chain_h, chain_w = loss_and_grads(marked=False)
    torch.testing.assert_close(loss, chain_loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad_h, chain_h, rtol=1e-3, atol=1e-5)
    if head_trains:
        torch.testing.assert_close(grad_w, chain_w, rtol=1e-3, atol=1e-5)
    else:
        assert grad_w is None


def test_the_fused_rows_leave_soft_capped_and_other_heads_alone(llama_dir):
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    head = model.get_output_embeddings()
    assert not cpu_fused.takes_loss(head, BF16, None)  # not marked
    cpu_fused.apply_fused_kernels(model)
    assert cpu_fused.takes_loss(head, BF16, None) and cpu_fused.takes_loss(head, torch.float32, None)
    assert not cpu_fused.takes_loss(head, BF16, 30.0)  # Gemma 2's soft-capping: the chain
    assert not cpu_fused.takes_loss(head, torch.float16, None)

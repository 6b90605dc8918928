"""RMSNorm and SwiGLU of Llama-family decoder blocks, and the LM head's cross-entropy rows, as single
C++ passes on the CPU (`train.fused_kernels`).

transformers computes them as chains of PyTorch operations, each reading and writing the whole
activation: RMSNorm is eight of them forward (to float32, square, mean, add, rsqrt, multiply, back to
the input dtype, times the weight) and more backward; SwiGLU three forward and five backward. On the
31.6M benchmark workload (a packed row of ~1,400 tokens, bf16) one RMSNorm's forward and backward
take 3.9 ms as a chain and 1.2 ms fused; the whole LoRA step gains 2-6% (`benchmarks.fused_kernels`,
BENCHMARKS.md), as most of it is matrix products. `cpu_fused.cpp` does each in one pass per row, with
the same arithmetic:

RMSNorm, x (N, H) in dtype X, weight w (H,) in W, P = the promoted dtype of X and W:

    r_i = 1 / sqrt(mean_h x_ih^2 + eps)                         float32
    n_ih = X(x_ih r_i)                                          `.to(input_dtype)`
    y_ih = P(w_h n_ih)
    backward, from dy:
    g_ih = X(dy_ih w_h)                                         autograd's grad of n, in n's dtype
    dx_ih = X(r_i g_ih - r_i^3 x_ih (sum_h g_ih x_ih) / H)      through n = x r(x)
    dw_h = W(sum_i dy_ih n_ih)

SwiGLU, gate and up (N, I) in dtype D (`down(act(gate(x)) * up(x))` with act = SiLU):

    s = sigmoid(gate),  a = D(gate s),  h = D(a up)
    backward, from dh:
    d_up = D(dh a),  d_a = D(dh up),  d_gate = D(d_a s (1 + gate (1 - s)))

Every value is float32 inside and rounded to the tensor dtype (round-to-nearest-even) exactly where
transformers rounds it, so a bf16 result equals the module's except where a float32 sum taken in
another order crosses a rounding boundary (tests/unit/test_cpu_fused.py measures both). SwiGLU keeps
gate and up for backward and recomputes s and a, where autograd keeps gate, a and up.

Cross-entropy rows, logits z (n, V) in dtype D (the chunked loss's head output), targets y (n,):

    m = max_v z_v,  s = sum_v exp(z_v - m),  loss = m + log s - z_y                  float32
    g_v = D(exp(z_v - m) / s - [v = y])                                     dL/dz, rounded once

the same values as `tunelab.losses.causal_lm`'s chain (a float32 softmax, the loss read off it, the
one-hot subtracted, then cast to D), which writes and reads (n, V) float32 arrays several times: at a
49,152-token vocabulary a chunk of 1,024 rows is 200 MB per array, far beyond the caches. Here a row
(96 KB in bf16) is read from memory once and the gradient written once. exp is the kernels' own
polynomial (relative error below 2e-7) and the sums run in another order, so values differ from
PyTorch's in the last float32 bits (tests/unit/test_cpu_fused.py).

`apply_fused_kernels(model)` replaces the `forward` of each RMSNorm and MLP module whose code is
transformers' Llama code (Llama, Mistral, Qwen2, Qwen3, Phi-3's norms; Gemma's norms differ and
are left alone), on that module object only, and marks a linear LM head (`FUSED_LOSS`) for the
cross-entropy rows (any architecture; not with Gemma 2's logit soft-capping). A patched forward
falls back to the module's own for inputs the kernels do not take (not on the CPU, float16).
"""

from __future__ import annotations

import functools
import types
from pathlib import Path

import torch
from torch import nn

from tunelab.kernels import native

SOURCE = Path(__file__).with_name("cpu_fused.cpp")
KERNEL_DTYPES = (torch.float32, torch.bfloat16)
FUSED_LOSS = "_tunelab_fused_loss"
"""Attribute `apply_fused_kernels` sets on a linear LM head: its chunked loss takes `cross_entropy_rows`."""


@functools.cache
def _extension():
    """The compiled kernels, or None where they cannot be built (the reason is printed once)."""
    return native.build("tunelab_cpu_fused", SOURCE, "keeping transformers' RMSNorm and MLP")


def build() -> bool:
    """Build (or load the cached build of) the kernels now; whether they are available."""
    return _extension() is not None


class _RMSNorm(torch.autograd.Function):
    """x (..., H), weight (H,) -> (..., H) in the promoted dtype (module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        x = x.contiguous()
        y, rstd = _extension().rms_norm_forward(x, weight, eps)  # (..., H), (rows,)
        ctx.save_for_backward(x, weight, rstd)
        ctx.eps = eps  # for `rms_norm_values` (tunelab.training.saved_tensors)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, rstd = ctx.saved_tensors
        want_w = ctx.needs_input_grad[1]
        grads = _extension().rms_norm_backward(grad_y.contiguous(), x, weight, rstd, want_w)
        return grads[0], (grads[1] if want_w else None), None


class _SwiGLU(torch.autograd.Function):
    """gate, up (..., I) of one dtype -> silu(gate) * up (module docstring)."""

    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        return _extension().swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_gate, grad_up = _extension().swiglu_backward(grad.contiguous(), gate, up)
        return grad_gate, grad_up


def _takes(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype in KERNEL_DTYPES for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama RMSNorm of x (..., H) with `weight` (H,), in one pass each way."""
    return _RMSNorm.apply(x, weight, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (same shape and dtype), rounded where transformers' MLP rounds."""
    return _SwiGLU.apply(gate, up)


def rms_norm_values(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The RMSNorm of the contiguous x that `_RMSNorm` saved, outside autograd: the same bits as its
    forward (`tunelab.training.saved_tensors` rebuilds the output for backward with it)."""
    return _extension().rms_norm_forward(x, weight, eps)[0]


def swiglu_values(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up from the contiguous tensors `_SwiGLU` saved, outside autograd: the same bits
    as its forward (`tunelab.training.saved_tensors` rebuilds the output for backward with it)."""
    return _extension().swiglu_forward(gate, up)


def takes_loss(head: nn.Module, dtype: torch.dtype, softcap: float | None) -> bool:
    """Whether the chunked loss of `head`, computing its logits in `dtype`, takes the C++ rows."""
    marked = getattr(head, FUSED_LOSS, False) and softcap is None
    return marked and head.weight.device.type == "cpu" and dtype in KERNEL_DTYPES


def cross_entropy_rows(
    logits: torch.Tensor, targets: torch.Tensor, want_grad: bool, in_place: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits (n, V) float32 or bf16 on the CPU, targets (n,) -> (lse - z_y (n,) float32, and with
    `want_grad` softmax(z) - onehot(y) (n, V) in the logits' dtype, else None). `in_place` writes the
    gradient over contiguous logits (the caller's tensor: one (n, V) array instead of two)."""
    logits = logits.contiguous()
    loss, grad = _extension().cross_entropy_rows(logits, targets.long().contiguous(), want_grad, in_place)
    return loss, grad if want_grad else None


def _fused_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if not _takes(hidden_states, self.weight):
        return type(self).forward(self, hidden_states)
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _fused_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    gate = self.gate_proj(x)  # (..., I)
    up = self.up_proj(x)  # (..., I)
    if gate.dtype == up.dtype and _takes(gate, up):
        return self.down_proj(swiglu(gate, up))
    return self.down_proj(self.act_fn(gate) * up)


def _same_code(function, reference) -> bool:
    """Whether two functions compile to the same code (same bytecode, names and constants): the
    norm and MLP classes of Mistral, Qwen2, ... are copies of Llama's, each class its own."""
    a, b = function.__code__, reference.__code__
    return (a.co_code, a.co_names, a.co_consts) == (b.co_code, b.co_names, b.co_consts)


@functools.cache
def _llama_classes() -> tuple[type, type, tuple[type, ...]]:
    from transformers.activations import SiLUActivation
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    return LlamaRMSNorm, LlamaMLP, (SiLUActivation, nn.SiLU)


def fusable(module: nn.Module) -> str | None:
    """`norm` or `mlp` where `module` computes exactly transformers' Llama RMSNorm or SwiGLU MLP (and
    has not been patched yet); else None."""
    if "forward" in module.__dict__:  # patched already, or replaced by someone else
        return None
    norm_class, mlp_class, silu_classes = _llama_classes()
    forward = type(module).forward
    if _same_code(forward, norm_class.forward) and isinstance(getattr(module, "weight", None), torch.Tensor):
        return "norm"
    if _same_code(forward, mlp_class.forward) and isinstance(getattr(module, "act_fn", None), silu_classes):
        return "mlp"
    return None


def apply_fused_kernels(model: nn.Module) -> dict[str, int]:
    """Give every fusable RMSNorm and MLP module of `model` the fused forward (on that object only;
    the class and its other instances are untouched), and mark a linear LM head for the fused
    cross-entropy rows. Returns how many of each were patched."""
    counts = {"norm": 0, "mlp": 0, "loss": 0}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is nn.Linear:
        setattr(head, FUSED_LOSS, True)
        counts["loss"] = 1
    forwards = {"norm": _fused_norm_forward, "mlp": _fused_mlp_forward}
    for module in model.modules():
        kind = fusable(module)
        if kind is not None:
            module.forward = types.MethodType(forwards[kind], module)
            counts[kind] += 1
    return counts


def remove_fused_kernels(model: nn.Module) -> None:
    """Undo `apply_fused_kernels`: every module goes back to its class's forward."""
    for module in model.modules():
        module.__dict__.pop(FUSED_LOSS, None)
        forward = module.__dict__.get("forward")
        if isinstance(forward, types.MethodType) and forward.__func__ in (
            _fused_norm_forward,
            _fused_mlp_forward,
        ):
            del module.forward

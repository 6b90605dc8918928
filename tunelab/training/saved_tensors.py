"""What a training forward pass keeps for backward, without the copies it can rebuild exactly.

Under autocast a float32 model (full fine-tuning: float32 master weights, bf16 compute) saves, for
every matrix product, bf16 *copies* that backward needs but that are bit-for-bit functions of
tensors kept anyway:

- **Casts of weights.** `linear(x, W)` computes with `W16 = bf16(W)` and saves it (backward needs
  dL/dx = dL/dy W16). Autocast also keeps every `W16` in its cache until the forward pass ends.
  That is 2 bytes per parameter: 256 MiB on SmolLM2-135M. Here the cast is not saved; backward
  casts `W` again (`W` cannot change before backward: the optimizer steps after it, and a changed
  version is an error, as autograd's own check makes it), and the cache is off
  (`torch.autocast(cache_enabled=False)`), so each `W16` lives for its one product.
- **Casts of a norm's output.** q, k and v projections each cast the same float32 norm output to
  bf16 and each save their copy; so do the gate and up projections: five copies per decoder layer.
  The fused RMSNorm (`tunelab.kernels.cpu_fused`) saves its input and weight anyway, so each copy
  is rebuilt in backward by the same kernel and cast again (229 MiB at 1,739 tokens on
  SmolLM2-135M). Repeated casts of any other activation (an unfused norm's output) are equal, one
  tensor with one rounding, so the second and later are saved as the first.
- **SwiGLU's output.** `down(silu(g) u)` saves `h = silu(g) u` for dL/dW_down, and the fused SwiGLU
  saves g and u for its own backward. h is recomputed from them by the same kernel, so it is the
  same bits (153 MiB at 1,739 tokens on SmolLM2-135M).

Without autocast (a float32 run with the fused kernels), the same two activations are saved as
they are, not as casts: the fused RMSNorm's output (the input of q, k, v and of gate, up: kept by
LoRA's A for dL/dA, by a trainable weight for dL/dW) and SwiGLU's output. Both are rebuilt in
backward the same way, from what their own nodes keep. On the 31.6M benchmark workload (LoRA r=16,
float32, one packed row of 1,128 tokens) what a step keeps between the passes falls from 289 to
209 MiB with the fused kernels (336 MiB with transformers' chain).

Backward pays for it in recomputation: per layer one cast per weight, five RMSNorm passes (one per
projection that cast a norm output) and one SwiGLU pass, all elementwise next to the products;
a SmolLM2 full step ran as fast as before (5.6 s both ways, 1,739 tokens).

The graph and every operation in it stay as autograd builds them: only what is stored between the
passes changes (`torch.autograd.graph.saved_tensors_hooks`), so gradients are bit-for-bit those of
the plain pass (tests/unit/test_saved_tensors.py). A bf16 model (LoRA and the other frozen-base
methods) makes no casts; like a float32 one, it saves the fused norm's and SwiGLU's outputs
themselves. A saved tensor is identified by the node that made it (`grad_fn`, through views to
their base): a `ToCopyBackward0` whose source is a leaf parameter (a weight cast) or another node's
output (an activation cast), or the fused RMSNorm's or SwiGLU's node.
"""

from __future__ import annotations

import contextlib

import torch

from tunelab.kernels import cpu_fused

CAST_NODE = "ToCopyBackward0"
SWIGLU_NODE = "_SwiGLUBackward"
NORM_NODE = "_RMSNormBackward"


class LeanSaving:
    """`pack`/`unpack` for `saved_tensors_hooks` over one forward pass (module docstring)."""

    def __init__(self) -> None:
        self.casts: dict[tuple[int, int, torch.dtype], tuple[torch.autograd.graph.Node, torch.Tensor]] = {}
        """(id of the source node, its output number, dtype) -> (that node, the first cast saved)."""

    def pack(self, tensor: torch.Tensor):
        """What to keep for `tensor`: itself, or how to rebuild it (a tuple `unpack` reads)."""
        base = tensor if tensor._base is None else tensor._base
        node = base.grad_fn
        name = type(node).__name__ if node is not None else None
        if name == CAST_NODE:
            source, output = node.next_functions[0]
            if source is None or base.dtype == torch.float32:
                return tensor
            variable = getattr(source, "variable", None)
            if isinstance(variable, torch.Tensor):  # AccumulateGrad: a cast of a leaf parameter
                plain = type(variable) in (torch.Tensor, torch.nn.Parameter)
                if not plain or variable.shape != base.shape or variable.stride() != base.stride():
                    return tensor  # a DTensor, a quantised or otherwise special weight: kept as saved
                return ("weight", variable, variable._version, base.dtype, *layout(tensor))
            if type(source).__name__ == NORM_NODE:  # a cast of the fused RMSNorm's output
                rebuilt = norm_rebuild(source, base, tensor)
                if rebuilt is not None:
                    return rebuilt
            key = (id(source), output, base.dtype)
            first = self.casts.get(key)
            if first is not None and first[0] is source and layout(first[1]) == layout(base):
                return ("alias", first[1], *layout(tensor))
            self.casts[key] = (source, base)
            return tensor
        if name == NORM_NODE:  # the fused RMSNorm's output itself
            return norm_rebuild(node, base, tensor) or tensor
        if name == SWIGLU_NODE and base.is_contiguous():
            gate, up = node.saved_tensors
            if gate.shape == base.shape:
                return ("swiglu", gate, up, *layout(tensor))
        return tensor

    @staticmethod
    def unpack(packed):
        """The saved tensor again: as kept, or rebuilt (same bits, same size, stride and offset)."""
        if isinstance(packed, torch.Tensor):
            return packed
        kind, *rest = packed
        if kind == "weight":
            weight, version, dtype, size, stride, offset = rest
            if weight._version != version:
                raise RuntimeError(
                    "a weight needed for the gradient was modified in place between forward and backward"
                )
            return weight.detach().to(dtype).as_strided(size, stride, offset)
        if kind == "norm":
            x, weight, eps, dtype, size, stride, offset = rest
            return cpu_fused.rms_norm_values(x, weight, eps).to(dtype).as_strided(size, stride, offset)
        if kind == "alias":
            first, size, stride, offset = rest
            return first.as_strided(size, stride, offset)
        gate, up, size, stride, offset = rest  # "swiglu"
        return cpu_fused.swiglu_values(gate, up).as_strided(size, stride, offset)


def norm_rebuild(norm: torch.autograd.graph.Node, base: torch.Tensor, tensor: torch.Tensor) -> tuple | None:
    """How `unpack` rebuilds `base`, the output of the fused RMSNorm node `norm` or a cast of it to
    `base.dtype` (`tensor` a view of it): from the input and weight the node keeps, or None where
    `base` is not laid out as that output."""
    if not base.is_contiguous():
        return None
    x, weight, _ = norm.saved_tensors
    if x.shape != base.shape:
        return None
    return ("norm", x, weight, norm.eps, base.dtype, *layout(tensor))


def layout(tensor: torch.Tensor) -> tuple[torch.Size, tuple[int, ...], int]:
    """Size, stride and storage offset: the view to take again of a rebuilt base."""
    return tensor.size(), tensor.stride(), tensor.storage_offset()


class lean_autocast:  # noqa: N801 (a context, named like `torch.autocast`)
    """Autocast to `dtype` without its weight cache, saving tensors through `LeanSaving`; with
    `dtype` None, no autocast (a float32 pass), only the saving. Like `torch.autocast`, one object
    can be entered again after it exits (evaluation enters its context once per batch)."""

    def __init__(self, device_type: str, dtype: torch.dtype | None):
        self.device_type, self.dtype = device_type, dtype
        self.stack: contextlib.ExitStack | None = None

    def __enter__(self) -> None:
        lean = LeanSaving()
        stack = contextlib.ExitStack()
        if self.dtype is not None:
            stack.enter_context(
                torch.autocast(device_type=self.device_type, dtype=self.dtype, cache_enabled=False)
            )
        # `unpack` is held by every saved tensor: a static method, so that none holds `lean`.
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(lean.pack, LeanSaving.unpack))
        stack.callback(lean.casts.clear)  # graph nodes: none is held past the pass
        self.stack = stack

    def __exit__(self, *exc) -> None:
        stack, self.stack = self.stack, None
        stack.close()

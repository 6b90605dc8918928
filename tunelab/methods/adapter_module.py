"""The bottleneck adapter module and the wrapper that puts it beside or after a layer.

Maths. For a hidden vector h in R^d and a bottleneck size b << d, an adapter computes

    f(h) = W_up · drop(act(W_down · h + b_down)) + b_up,     W_down: (b, d), W_up: (d, b)

and is added to the stream it adapts:

    serial   (Houlsby et al. 2019; Pfeiffer et al. 2020):  y = g(x);   y' = y + s · f(y)
    parallel (He et al. 2021, "Towards a Unified View of Parameter-Efficient Transfer Learning"):
                                                          y' = g(x) + s · f(x)

where g is the wrapped layer (the attention output projection or the feed-forward block) and s is
`scale` (1 by default; He et al. use s = 4 for their parallel feed-forward adapter).

Initialisation: W_down as `nn.Linear` (Kaiming-uniform), b_down = 0, and W_up = 0, b_up = 0, so
that f(h) = 0 and a freshly adapted model computes the base model's outputs exactly. Houlsby et al.
draw both projections from N(0, 1e-2) ("near identity"); we zero the up-projection instead (as LoRA
zeroes B) so that the identity is exact rather than approximate.

Trainable parameters of one adapter, with biases: 2·d·b + b + d.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tunelab.errors import TunelabError

ACTIVATIONS = {
    "relu": lambda: nn.ReLU(),
    "gelu": lambda: nn.GELU(),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": lambda: nn.SiLU(),
    "tanh": lambda: nn.Tanh(),
}

ADAPTERS_PER_LAYER = {"houlsby": 2, "pfeiffer": 1, "parallel": 1}


class BottleneckAdapter(nn.Module):
    """f(h) = W_up · drop(act(W_down · h + b_down)) + b_up, mapping (..., d) -> (..., d).

    The residual (adding f back to the stream) is the wrapper's job, see `AdapterLayer`.
    """

    def __init__(self, hidden_size: int, bottleneck: int, activation: str = "relu", dropout: float = 0.0):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise TunelabError(
                f"unknown adapter activation {activation!r}; choose one of {sorted(ACTIVATIONS)}"
            )
        self.down = nn.Linear(hidden_size, bottleneck)  # weight (b, d), bias (b,)
        self.act = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, hidden_size)  # weight (d, b), bias (d,)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """W_down Kaiming-uniform (as `nn.Linear`), every other tensor zero: f(h) = 0."""
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """f(h) in the dtype of `h`. Outside autocast it is computed in the adapter's own dtype (float32
        master weights beside a bfloat16/float16 base: `tunelab.training.setup.prepare_model`, and a
        loaded adapter) and cast back; under autocast the matmuls run in the autocast dtype."""
        dtype = h.dtype
        if not torch.is_autocast_enabled(h.device.type):
            h = h.to(next(self.parameters()).dtype)  # the adapter's own dtype
        z = self.act(self.down(h))  # (B, T, b)
        return self.up(self.dropout(z)).to(dtype)  # (B, T, d)


class AdapterLayer(nn.Module):
    """A layer `base_layer` with an adapter added to its output.

    Serial: y' = y + s · f(y) with y = base_layer(x). Parallel: y' = base_layer(x) + s · f(x), where
    x is the layer's first argument. With `enabled` False it is `base_layer` itself.
    """

    def __init__(self, base_layer: nn.Module, adapter: BottleneckAdapter, scale: float, parallel: bool):
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.scale = scale
        self.parallel = parallel
        self.enabled = True

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(hidden_states, *args, **kwargs)  # (B, T, d)
        if not self.enabled:
            return out
        if not isinstance(out, torch.Tensor):
            raise TunelabError(
                f"adapter: {type(self.base_layer).__name__} returns {type(out).__name__}, not a tensor; "
                "choose another module with attn_output_module / mlp_module"
            )
        adapter_input = hidden_states if self.parallel else out  # (B, T, d)
        return out + self.scale * self.adapter(adapter_input).to(out.dtype)  # the stream keeps its dtype

    def extra_repr(self) -> str:
        return f"scale={self.scale}, parallel={self.parallel}"


def adapter_parameter_count(hidden_size: int, bottleneck: int) -> int:
    """Parameters of one adapter: W_down (b·d) + b_down (b) + W_up (d·b) + b_up (d) = 2·d·b + b + d."""
    return 2 * hidden_size * bottleneck + bottleneck + hidden_size


def trainable_parameter_formula(
    hidden_size: int, bottleneck: int, placement: str, num_layers: int, norm_params_per_layer: int = 0
) -> int:
    """Trainable parameters of an adapted model:

        num_layers · (adapters_per_layer · (2·d·b + b + d) + norm_params_per_layer)

    with adapters_per_layer = 2 for `houlsby` and 1 for `pfeiffer` and `parallel`;
    `norm_params_per_layer` counts the layer norms of one layer when `train_layer_norms` is on
    (RMSNorm: d each; LayerNorm: 2·d each).
    """
    per_layer = ADAPTERS_PER_LAYER[placement] * adapter_parameter_count(hidden_size, bottleneck)
    return num_layers * (per_layer + norm_params_per_layer)

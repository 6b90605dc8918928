"""The LoRA layer: a frozen linear map plus a trainable low-rank update.

Paper: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv:2106.09685).

For a frozen weight W (out, in) the wrapped layer computes

    y = W x + b + s * B A dropout(x),      A: (r, in), B: (out, r),  r << min(in, out)

with scale s = alpha / r, or s = alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023, arXiv:2312.03732),
which keeps the update's magnitude stable as r grows. Only A and B train: r * (in + out)
parameters instead of in * out.

Initialisation as in the paper and its reference code (microsoft/LoRA `loralib`): A is
Kaiming-uniform with a = sqrt(5) (PyTorch's default for `nn.Linear`), or Gaussian N(0, 1/r) with
`init: gaussian`; B = 0. So B A = 0 and a freshly wrapped model computes the base model exactly.

Merging folds the update into the weight, W <- W + s B A, so inference costs nothing extra;
unmerging subtracts it again (exact up to floating-point rounding).

GPT-2's `transformers.pytorch_utils.Conv1D` stores its weight transposed, (in, out), and computes
y = x W + b. A and B keep the same shapes as for `nn.Linear` (so files match PEFT's, which marks such
models `fan_in_fan_out: true`); only the merged delta is transposed: W <- W + s (B A)^T.

Where we depart from the paper: the paper adapts only W_q and W_v and has no dropout on the
LoRA path; dropout on the input of A follows PEFT and the paper's released code. When the base
weights are float16/bfloat16, A and B are kept in float32 (as PEFT does by default): the input is
cast to float32 for the low-rank path and the update is cast back to the base's dtype. Under
autocast (and whenever the dtypes agree) the update is added by one `addmm`, y + s h B^T with
h = A dropout(x), so it accumulates into the base output instead of being written out and added.

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv:2402.09353), with
`use_dora`, splits the adapted weight into a magnitude and a direction and trains the magnitude
m (out,) beside A and B:

    W' = m * (W + s B A) / ||W + s B A||_c,        y = W' x + b

where ||.||_c is the norm of each output row (over the input dimension; "column-wise" in the
paper's (in, out) notation) and m starts at ||W||_c, so a fresh layer is again the identity. As
in the paper (section 4.3) and PEFT, the norm n = ||W + s B A||_c is treated as a constant in
backward (detached): it saves the memory of its graph, and the gradient still reaches A and B
through the direction. Computed from the base output y = W x + b:

    y' = y + (m / n - 1) * (W x) + (m / n) * s B A x

With dropout active (training), both LoRA terms take dropout(x), so W x is recomputed on it (as
PEFT does). Merging folds W <- (m / n) (W + s B A) and keeps n to unmerge exactly. Each forward
computes n from the whole weight: DoRA's extra cost over LoRA (measured in BENCHMARKS.md).

Quantised bases (QLoRA; `tunelab.quantization`): bitsandbytes' `Linear4bit` and `Linear8bitLt`
are wrapped like `nn.Linear` (shapes from their `in_features`/`out_features`), stay frozen and
quantised, and A, B (and m) are float32. DoRA's norm needs the dequantised weight W
(`tunelab.quantization.dequantized_weight`). A quantised layer does not merge: folding s B A in
would requantise W and lose the update; `tunelab merge` reloads the base in full precision instead.

`SavedModule` serves `modules_to_save`: a module trained in full (e.g. `lm_head`, a reward head).
It keeps the original frozen and trains a copy, so that disabling the method gives the base model
back, as PEFT's `ModulesToSaveWrapper` does.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from tunelab.errors import TunelabError
from tunelab.quantization import dequantized_weight, keep_standard_layout, quantized_kind

SUPPORTED_LAYERS = (nn.Linear, Conv1D)
"""Layers LoRA wraps; bitsandbytes' `Linear4bit` and `Linear8bitLt` subclass `nn.Linear`."""


class LoRALinear(nn.Module):
    """A frozen `nn.Linear`, `Conv1D` or quantised linear layer (kept as `base_layer`) plus the
    update s * B A, or DoRA's m * (W + s B A) / ||W + s B A||_c with `use_dora`."""

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        use_dora: bool = False,
    ):
        super().__init__()
        if not isinstance(base_layer, SUPPORTED_LAYERS):
            raise TypeError(f"LoRA wraps nn.Linear or Conv1D, not {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.quantized = quantized_kind(base_layer)  # None, "4bit" or "8bit"
        keep_standard_layout(base_layer)  # DoRA dequantises W (tunelab.quantization)
        weight = base_layer.weight
        if self.quantized:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        elif self.fan_in_fan_out:
            self.in_features, self.out_features = weight.shape  # Conv1D: (in, out)
        else:
            self.out_features, self.in_features = weight.shape  # Linear: (out, in)
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Half-precision and quantised bases get float32 adapters (see the module docstring).
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        kwargs = dict(bias=False, device=weight.device, dtype=dtype)
        self.lora_A = nn.Linear(self.in_features, r, **kwargs)  # weight (r, in)
        self.lora_B = nn.Linear(r, self.out_features, **kwargs)  # weight (out, r)
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / r)
        else:
            raise ValueError(f"unknown LoRA init {init!r}; choose 'kaiming' or 'gaussian'")
        nn.init.zeros_(self.lora_B.weight)
        self.use_dora = use_dora
        self.lora_magnitude_vector: nn.Parameter | None = None
        if use_dora:  # m = ||W + s B A||_c = ||W||_c, as B = 0
            self.lora_magnitude_vector = nn.Parameter(self.weight_norm())  # (out,)
        self.merged_norm: torch.Tensor | None = None  # DoRA's n at merge time, to unmerge exactly
        self.merged = False
        self.enabled = True

    def base_weight(self) -> torch.Tensor:
        """W as (out, in) in the adapters' dtype: Conv1D's transposed back, a quantised one dequantised."""
        if self.quantized:
            weight = dequantized_weight(self.base_layer)  # (out, in)
        else:
            weight = self.base_layer.weight.T if self.fan_in_fan_out else self.base_layer.weight
        return weight.to(self.lora_A.weight.dtype)  # (out, in)

    def weight_norm(self) -> torch.Tensor:
        """DoRA's n = ||W + s B A||_c, the norm of each output row: (out,). Without gradient (detached,
        see the module docstring)."""
        with torch.no_grad():
            delta = self.scaling * (self.lora_B.weight @ self.lora_A.weight)  # (out, in)
            return torch.linalg.vector_norm(self.base_weight() + delta, dim=1)  # (out,)

    def delta_weight(self) -> torch.Tensor:
        """s * B A in the base weight's layout and dtype: (out, in) for Linear, (in, out) for Conv1D."""
        delta = self.scaling * (self.lora_B.weight @ self.lora_A.weight)  # (out, in)
        if self.fan_in_fan_out:
            delta = delta.T  # (in, out)
        return delta.to(self.base_layer.weight.dtype)

    def _check_mergeable(self) -> None:
        if self.quantized:
            raise TunelabError(
                f"lora: cannot merge into a {self.quantized} quantised layer (requantising would lose the "
                "update); `tunelab merge` folds the adapter into the base reloaded in full precision"
            )

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + s B A; with DoRA W <- (m / n) (W + s B A). Does nothing when already merged."""
        if self.merged:
            return
        self._check_mergeable()
        weight = self.base_layer.weight
        if not self.use_dora:
            weight.data += self.delta_weight()
        else:
            self.merged_norm = self.weight_norm()  # (out,), from the unmerged weight
            factor = (self.lora_magnitude_vector / self.merged_norm).unsqueeze(1)  # (out, 1)
            delta = self.scaling * (self.lora_B.weight @ self.lora_A.weight)  # (out, in)
            merged = factor * (self.base_weight() + delta)  # (out, in)
            weight.data.copy_(merged.T if self.fan_in_fan_out else merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - s B A; with DoRA W <- W n / m - s B A. Does nothing when not merged."""
        if not self.merged:
            return
        weight = self.base_layer.weight
        if not self.use_dora:
            weight.data -= self.delta_weight()
        else:
            factor = (self.lora_magnitude_vector / self.merged_norm).unsqueeze(1)  # (out, 1)
            delta = self.scaling * (self.lora_B.weight @ self.lora_A.weight)  # (out, in)
            unmerged = self.base_weight() / factor - delta  # (out, in)
            weight.data.copy_(unmerged.T if self.fan_in_fan_out else unmerged)
            self.merged_norm = None
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        y = self.base_layer(x)  # (..., out)
        if self.merged or not self.enabled:
            return y
        if self.use_dora:
            return self._dora_forward(x, y)
        autocast = torch.is_autocast_enabled(x.device.type)
        if not autocast:  # autocast casts x and A itself
            x = x.to(self.lora_A.weight.dtype)
        h = self.lora_A(self.lora_dropout(x))  # (..., r)
        if autocast or h.dtype == y.dtype:
            # y + s h B^T in one addmm: the product accumulates straight into a copy of y, one
            # pass over the (..., out) output instead of a matmul's output, then an add.
            out = torch.addmm(
                y.reshape(-1, y.shape[-1]), h.reshape(-1, self.r), self.lora_B.weight.t(), alpha=self.scaling
            )
            return out.view(y.shape)  # (..., out)
        # A half-precision base without autocast: the update is computed in float32 and cast back.
        # s B h = B (s h): scaling the r-wide h costs out / r times less than scaling B h.
        return y + self.lora_B(h * self.scaling).to(y.dtype)  # (..., out)

    def _dora_forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y' = y + (m / n - 1) W x + (m / n) s B A x, from the base output y = W x + b (module docstring)."""
        autocast = torch.is_autocast_enabled(x.device.type)
        if not autocast:
            x = x.to(self.lora_A.weight.dtype)
        scale = self.lora_magnitude_vector / self.weight_norm()  # (out,) m / n, n detached
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:  # W x from the base output
            update = self.lora_B(self.lora_A(x)) * self.scaling  # (..., out)
            base = y if self.base_layer.bias is None else y - self.base_layer.bias
        else:  # W dropout(x), recomputed (as PEFT does)
            dropped = self.lora_dropout(x)
            update = self.lora_B(self.lora_A(dropped)) * self.scaling  # (..., out)
            base = nn.functional.linear(dropped, self.base_weight().to(dropped.dtype))  # (..., out)
        return y + ((scale - 1) * base + scale * update).to(y.dtype)  # (..., out)

    def extra_repr(self) -> str:
        kind = "Conv1D" if self.fan_in_fan_out else "Linear"
        if self.quantized:
            kind = type(self.base_layer).__name__  # Linear4bit, Linear8bitLt
        dora = ", dora" if self.use_dora else ""
        return (
            f"{kind}({self.in_features} -> {self.out_features}), r={self.r}, scaling={self.scaling:g}{dora}"
        )


class SavedModule(nn.Module):
    """A module trained in full (`modules_to_save`): a trainable copy beside the frozen original."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module
        self.trained_module = copy.deepcopy(module)
        for p in self.original_module.parameters():
            p.requires_grad_(False)
        for p in self.trained_module.parameters():
            p.requires_grad_(True)
        self.enabled = True

    @property
    def active(self) -> nn.Module:
        """The module that computes the output now: the trained copy, or the original when disabled."""
        return self.trained_module if self.enabled else self.original_module

    @property
    def weight(self) -> torch.Tensor:
        """The active module's weight (Hugging Face code reads `lm_head.weight`, `embed_tokens.weight`)."""
        return self.active.weight

    def forward(self, *args, **kwargs):
        return self.active(*args, **kwargs)

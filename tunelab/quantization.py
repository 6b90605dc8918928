"""Quantised frozen bases (QLoRA) through bitsandbytes: the load-time config and the layer facts.

QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314)
keeps the frozen base in 4 bits and trains LoRA beside it in higher precision. A 4-bit weight is
stored blockwise: each block of 64 values holds one absmax scale c and 4-bit codes q into a fixed
table T (NormalFloat `nf4`, quantiles of N(0, 1), or the float-like `fp4`), and

    W_ij = T[q_ij] * c_block(ij)

Double quantisation quantises the scales c themselves (8-bit, blocks of 256): about 0.37 bits per
weight less. The matmul dequantises W to `compute_dtype` and multiplies there, so y = x W^T + b
with the dequantised W exactly. 8 bits (LLM.int8(), Dettmers et al. 2022) stores one int8 row per
output with a per-row absmax scale, W_i = q_i * s_i / 127, and quantises each input row the same
way for an int8 matmul (input columns above `llm_int8_threshold`, 6, go through float16 instead).

Embeddings and the LM head (and a reward head `score`) stay unquantised, as in QLoRA. Loading goes
through transformers' `BitsAndBytesConfig` on the same `from_pretrained` call as a full-precision
base (`tunelab.models.load_model`); transformers quantises each tensor as it is read, so the
full-precision base never sits in memory whole (peak RSS measured in BENCHMARKS.md).

On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place the first time the layer
runs in eval mode without gradients, and from then on multiplies in bfloat16 (about 1e-3 off the
float32 result). tunelab keeps the standard layout (`keep_standard_layout`): a layer then computes
the same in training and evaluation, and DoRA can dequantise its weight.

bitsandbytes is imported only when a config asks for quantisation: `quantized_kind` recognises its
layers without importing it (a model holding them has imported it already).
"""

from __future__ import annotations

import logging
import sys

import torch
from torch import nn

from tunelab.config import QuantizationConfig
from tunelab.errors import TunelabError

# Kept in full precision, as QLoRA does: the output head of a causal LM and of a reward model.
UNQUANTIZED_MODULES = ["lm_head", "score"]


def require_bitsandbytes():
    """The `bitsandbytes` module, or a `TunelabError` saying how to install it."""
    try:
        import bitsandbytes
    except ImportError:
        raise TunelabError(
            "model.quantization.bits needs bitsandbytes: pip install 'tunelab[quant]'"
        ) from None
    # LLM.int8() casts float32 inputs to float16 and logs a warning about it on every matmul.
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _CastNoteFilter) for f in logger.filters):
        logger.addFilter(_CastNoteFilter())
    return bitsandbytes


class _CastNoteFilter(logging.Filter):
    """Drops bitsandbytes' per-matmul note that 8-bit inputs are cast to float16."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def bnb_config(quantization: QuantizationConfig):
    """transformers' `BitsAndBytesConfig` for `model.quantization` (bits 4 or 8)."""
    from transformers import BitsAndBytesConfig

    require_bitsandbytes()
    if quantization.bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantization.quant_type,
            bnb_4bit_use_double_quant=quantization.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, quantization.compute_dtype),  # float32, bfloat16, float16
            llm_int8_skip_modules=UNQUANTIZED_MODULES,
        )
    if quantization.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=UNQUANTIZED_MODULES)
    raise ValueError(f"quantization.bits must be 4 or 8 here, got {quantization.bits!r}")


def quantized_kind(module: nn.Module) -> str | None:
    """`4bit` for a bitsandbytes `Linear4bit`, `8bit` for a `Linear8bitLt`, else None."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None
    if isinstance(module, bnb.nn.Linear4bit):
        return "4bit"
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "8bit"
    return None


def keep_standard_layout(layer: nn.Module) -> None:
    """Keep a 4-bit layer's weight in bitsandbytes' standard layout on CPU (the module docstring):
    turn off its bfloat16 repacking, and undo it where it already happened (as bitsandbytes itself
    does before saving)."""
    if quantized_kind(layer) != "4bit":
        return
    layer.support_avx512bf16_for_cpu = False
    weight = layer.weight
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(
            weight.data, weight.quant_state
        )


def is_quantized(model: nn.Module) -> bool:
    """Does `model` hold bitsandbytes-quantised layers?"""
    return any(quantized_kind(m) is not None for m in model.modules())


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The weight a quantised linear layer stores, dequantised, (out, in), in float32: W_ij = T[q_ij] c
    for 4 bits (the weight its matmul uses), q_i s_i / 127 for 8 bits (see the module docstring)."""
    import bitsandbytes as bnb

    kind = quantized_kind(layer)
    weight = layer.weight
    if kind == "4bit":
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()  # (out, in)
    if kind == "8bit":
        scales = weight.SCB if weight.SCB is not None else layer.state.SCB  # (out,)
        return bnb.functional.int8_vectorwise_dequant(weight.data, scales).float()  # (out, in)
    raise TypeError(f"{type(layer).__name__} is not a bitsandbytes-quantised linear layer")

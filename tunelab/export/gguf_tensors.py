"""Hugging Face weights -> GGUF tensors and hyperparameters, per architecture.

GGUF (the file format of llama.cpp, which Ollama runs) names every tensor by its role (`token_embd`,
`blk.N.attn_q`, `output_norm`, ...) and describes the model by `ARCH.*` metadata keys. The names come
from the `gguf` package's own map (`gguf.get_tensor_name_map`), so they are llama.cpp's; what a name
map cannot say is where llama.cpp's layout departs from Hugging Face's, which this module states:

- **Rotary pairs (Llama, Mistral).** Hugging Face's Llama rotates dimension i of a head together with
  dimension i + d/2 (`rotate_half`); llama.cpp's LLAMA architecture rotates 2i with 2i+1. The rows of
  the query and key projections are therefore reordered per head, (n_heads, 2, d/2, in) ->
  (n_heads, d/2, 2, in): row 2i takes old row i, row 2i+1 old row i + d/2. The attention scores are
  unchanged because q and k are reordered alike. Qwen2, Phi-3 and Gemma are "NeoX-style" in
  llama.cpp (the Hugging Face pairing) and are written as they are.
- **Gemma's norms.** Gemma's RMSNorm computes `x * (1 + w)` and stores w; llama.cpp multiplies by the
  stored weight, so `1 + w` is written. Gemma's LM head is always its embedding (no `output` tensor).
- **GPT-2's Conv1D.** GPT-2 stores its projections as (in, out), the transpose of `nn.Linear`; GGUF
  wants (out, in), so they are transposed (found by module type, not by name).
- **Fused projections.** Phi-3's `qkv_proj` and `gate_up_proj` and GPT-2's `c_attn` are fused in both
  formats (`attn_qkv`, `ffn_up`) and go as they are.
- **Storage types.** 1-D tensors (norms, biases) stay float32, as llama.cpp keeps them; the matrices
  take the chosen type: f32, f16, bf16, or q8_0 (blocks of 32 values sharing one float16 scale,
  `gguf.quants`). A matrix whose rows are not whole q8_0 blocks is written f16.

A tied LM head is not written (GGUF's convention: no `output` tensor means "use `token_embd`").
Rotary scaling: linear (a `rope.scaling` key) and Llama 3.1's `llama3` (a `rope_freqs` tensor of
per-frequency divisors, the only tensor not taken from the model); yarn, longrope and dynamic
scaling are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import gguf
import numpy as np
import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from tunelab.errors import TunelabError


@dataclass(frozen=True)
class Architecture:
    """How one Hugging Face architecture (`config.model_type`) goes into GGUF."""

    gguf_arch: gguf.MODEL_ARCH
    rotary_interleaved: bool = False
    """llama.cpp rotates pairs (2i, 2i+1): query/key rows reordered from Hugging Face's (i, i + d/2)."""
    norm_plus_one: bool = False
    """The model computes `x * (1 + w)` (Gemma): `1 + w` is written."""
    head_in_file: bool = True
    """GGUF has an `output` tensor for this architecture; False: the head must be the embedding."""


ARCHITECTURES = {
    "llama": Architecture(gguf.MODEL_ARCH.LLAMA, rotary_interleaved=True),
    "mistral": Architecture(gguf.MODEL_ARCH.LLAMA, rotary_interleaved=True),  # llama.cpp's Mistral is LLAMA
    "qwen2": Architecture(gguf.MODEL_ARCH.QWEN2),
    "phi3": Architecture(gguf.MODEL_ARCH.PHI3),
    "gemma": Architecture(gguf.MODEL_ARCH.GEMMA, norm_plus_one=True, head_in_file=False),
    "gemma2": Architecture(gguf.MODEL_ARCH.GEMMA2, norm_plus_one=True, head_in_file=False),
    "gpt2": Architecture(gguf.MODEL_ARCH.GPT2),
}

# `--type` -> (the file's `general.file_type`, the storage type of its matrices)
FILE_TYPES = {
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}

# Buffers in some state dicts that are not weights (recomputed by every runtime).
NOT_WEIGHTS = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


@dataclass(frozen=True)
class TensorPlan:
    """One tensor of the file: where it comes from, its name, GGUF shape and storage type."""

    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]  # numpy order (rows, columns): the file stores it reversed, as ggml does
    storage: gguf.GGMLQuantizationType
    transposed: bool

    @property
    def nbytes(self) -> int:
        block, block_bytes = gguf.GGML_QUANT_SIZES[self.storage]
        return math.prod(self.shape) // block * block_bytes


def architecture_of(config: PretrainedConfig) -> Architecture:
    """The `Architecture` of a model config, or a `TunelabError` naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise TunelabError(
            f"GGUF export supports {sorted(ARCHITECTURES)}; this model's config.json says model_type={model_type!r}"
        )
    return ARCHITECTURES[model_type]


def head_is_tied(model: PreTrainedModel) -> bool:
    """Whether the LM head is the input embedding (the same tensor)."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    return head is None or head.weight.data_ptr() == embedding.weight.data_ptr()


def plan_tensors(model: PreTrainedModel, file_type: str) -> list[TensorPlan]:
    """Every tensor the file holds, in file order, with its GGUF name, shape and storage type."""
    config = model.config
    arch = architecture_of(config)
    names = gguf.get_tensor_name_map(arch.gguf_arch, config.num_hidden_layers)
    tied = head_is_tied(model)
    if not tied and not arch.head_in_file:
        raise TunelabError(
            f"GGUF's {gguf.MODEL_ARCH_NAMES[arch.gguf_arch]} architecture has no separate LM head, but this "
            "model's lm_head is not its embedding (config.json tie_word_embeddings=false)"
        )
    plans = []
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith(NOT_WEIGHTS) or (tied and hf_name == "lm_head.weight"):
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise TunelabError(
                f"the model's tensor {hf_name!r} has no place in GGUF's {gguf.MODEL_ARCH_NAMES[arch.gguf_arch]} "
                "architecture (gguf's tensor-name map does not know it)"
            )
        module = model.get_submodule(hf_name.rsplit(".", 1)[0])
        transposed = isinstance(module, Conv1D) and hf_name.endswith(".weight")
        shape = tuple(tensor.shape[::-1]) if transposed else tuple(tensor.shape)
        plans.append(TensorPlan(hf_name, gguf_name, shape, storage_type(shape, file_type), transposed))
    if config.model_type != "gpt2" and rope_parameters(config).get("rope_type") == "llama3":
        shape = rope_freq_factors(config).shape
        plans.append(TensorPlan("", ROPE_FREQS, shape, gguf.GGMLQuantizationType.F32, False))
    return plans


def storage_type(shape: tuple[int, ...], file_type: str) -> gguf.GGMLQuantizationType:
    """float32 for 1-D tensors; the file type's for matrices (f16 where rows are not whole q8_0 blocks)."""
    _, matrix_type = FILE_TYPES[file_type]
    if len(shape) == 1:
        return gguf.GGMLQuantizationType.F32
    block, _ = gguf.GGML_QUANT_SIZES[matrix_type]
    return matrix_type if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def gguf_values(model: PreTrainedModel, plan: TensorPlan) -> np.ndarray:
    """The float32 values of one planned tensor, in GGUF's layout (see the module docstring)."""
    config = model.config
    arch = architecture_of(config)
    if plan.gguf_name == ROPE_FREQS:
        return rope_freq_factors(config)
    data = model.get_parameter_or_buffer(plan.hf_name).detach().to("cpu", torch.float32)
    if plan.transposed:
        data = data.T  # Conv1D (in, out) -> (out, in)
    if arch.rotary_interleaved and ".attn_q." in plan.gguf_name:
        data = interleave_rotary(data, config.num_attention_heads)
    if arch.rotary_interleaved and ".attn_k." in plan.gguf_name:
        data = interleave_rotary(data, config.num_key_value_heads)
    if arch.norm_plus_one and plan.gguf_name.endswith("norm.weight"):
        data = data + 1.0
    return data.contiguous().numpy()


def interleave_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Query/key rows (a weight (H*d, in) or a bias (H*d,)) from Hugging Face's rotary pairing (i, i + d/2)
    to llama.cpp's (2i, 2i+1): per head, (2, d/2) -> (d/2, 2)."""
    rest = weight.shape[1:]
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, 2, half, *rest).transpose(1, 2).reshape(weight.shape)


def encode(values: np.ndarray, storage: gguf.GGMLQuantizationType) -> np.ndarray:
    """Values in their storage type, as the array the writer puts in the file (`gguf.quants`)."""
    return gguf.quants.quantize(values, storage)


ROPE_FREQS = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
WRITTEN_ROPE = ("default", "linear", "llama3")


def rope_parameters(config: PretrainedConfig) -> dict:
    """The config's rotary parameters; a rotary scaling this exporter does not write (yarn, longrope,
    dynamic, or any on a model other than Llama's) is a `TunelabError`."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type not in WRITTEN_ROPE or (rope_type == "llama3" and config.model_type != "llama"):
        raise TunelabError(
            f"config.json rope_scaling has rope_type={rope_type!r}; GGUF export writes rotary embeddings "
            f"{WRITTEN_ROPE} (llama3 for Llama models only)"
        )
    return rope


def rope_freq_factors(config: PretrainedConfig) -> np.ndarray:
    """llama.cpp's `rope_freqs` for Llama 3.1's rotary scaling (rope_type llama3): llama.cpp divides
    frequency i by factor i, so the factor is the unscaled inverse frequency over the scaled one, both
    computed by transformers' own rotary code: (head_dim / 2,)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))  # (d/2,)
    base = rope_parameters(config)["rope_theta"]
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    plain = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))  # (d/2,)
    return (plain / scaled).numpy().astype(np.float32)


def write_hyperparameters(writer: gguf.GGUFWriter, config: PretrainedConfig, vocab_rows: int) -> None:
    """The `ARCH.*` keys llama.cpp reads for this architecture (and transformers' GGUF reader maps
    back to a config)."""
    if config.model_type == "gpt2":
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        writer.add_block_count(config.n_layer)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        writer.add_vocab_size(vocab_rows)
        return
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rotary_fraction = (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_rope_dimension_count(int(head_dim * rotary_fraction))
    writer.add_vocab_size(vocab_rows)
    if head_dim * heads != config.hidden_size or config.model_type in ("gemma", "gemma2"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if config.model_type == "phi3":
        writer.add_rope_scaling_orig_ctx_len(
            getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings
        )
    if config.model_type == "gemma2":
        if config.query_pre_attn_scalar != head_dim:
            raise TunelabError(
                f"config.json query_pre_attn_scalar={config.query_pre_attn_scalar} differs from head_dim={head_dim}; "
                "GGUF has no key for it (llama.cpp scales Gemma 2's queries by 1/sqrt(head_dim))"
            )
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping or 0.0)
        writer.add_final_logit_softcapping(config.final_logit_softcapping or 0.0)
    if config.model_type in ("phi3", "gemma2") and getattr(config, "sliding_window", None):
        writer.add_sliding_window(config.sliding_window)

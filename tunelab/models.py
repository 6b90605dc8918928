"""Load a Hugging Face causal LM and its tokenizer, by hub id or local folder.

The same `from_pretrained` path serves a hub id and a local folder (tests and the demo use local
folders built by `tunelab.tiny`). `trust_remote_code` stays off unless the config asks for it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from tunelab.config import QuantizationConfig
from tunelab.errors import TunelabError, one_line
from tunelab.export.gguf_in import gguf_source, plain_model

# transformers' own per-file progress bars (loading/writing shards) would interleave with ours.
hf_logging.disable_progress_bar()

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else CPU; anything else is checked: a device name torch does
    not know, a CUDA device on a machine without CUDA or past its device count, is a `TunelabError`."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, ValueError):
        raise TunelabError(
            f"model.device={device!r} is not a device name (auto, cpu, cuda, cuda:N, mps)"
        ) from None
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise TunelabError(
                f"model.device={device!r}, but this machine has no CUDA device; use auto or cpu"
            )
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise TunelabError(
                f"model.device={device!r}, but this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise TunelabError(f"model.device={device!r}, but MPS is not available here; use auto or cpu")
    return chosen


def looks_like_local_path(name: str) -> bool:
    """A name meant as a local path (starts with `.`, `/`, `~`, exists, or has more than one `/`),
    as opposed to a hub id `owner/name`."""
    return name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") > 1


def check_model_source(name_or_path: str) -> None:
    """Fail early, with a clear message, for a local path that does not exist."""
    if not isinstance(name_or_path, str):
        raise TunelabError(f"a model must be named by a hub id or a folder path, not {name_or_path!r}")
    if looks_like_local_path(name_or_path) and not Path(name_or_path).expanduser().exists():
        raise TunelabError(f"model path {name_or_path!r} does not exist")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer; give it a pad token (its EOS) when it has none."""
    check_model_source(name_or_path)
    try:
        source, gguf_file = gguf_source(name_or_path)  # a .gguf file: its folder + gguf_file=NAME
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **gguf_file)
    except (OSError, ValueError) as err:
        raise TunelabError(f"cannot load a tokenizer from {name_or_path!r}: {one_line(err)}") from None
    if tokenizer.eos_token_id is None:
        raise TunelabError(
            f"the tokenizer of {name_or_path!r} has no end-of-sequence token: tunelab ends every example "
            "with it and stops generation there; set eos_token in its tokenizer_config.json"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str,
    dtype: str = "float32",
    device: str | torch.device = "auto",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    quantization: QuantizationConfig | None = None,
) -> PreTrainedModel:
    """Load a causal LM in `dtype` onto `device` (see `resolve_device`).

    With `quantization.bits` (4 or 8) the linear layers of the decoder blocks are quantised by
    bitsandbytes as each tensor is read (`tunelab.quantization`); the rest stays in `dtype`.
    """
    check_model_source(name_or_path)
    if dtype not in DTYPES:
        raise TunelabError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    kwargs = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    quantized = quantization is not None and quantization.bits is not None
    if quantized:
        from tunelab.quantization import bnb_config

        device = resolve_device(device) if isinstance(device, str) else device
        # Quantised on the device as each tensor is read; a quantised model cannot move after.
        kwargs["quantization_config"] = bnb_config(quantization)
        kwargs["device_map"] = {"": device}
    try:
        source, gguf_file = gguf_source(name_or_path)  # a .gguf file: its folder + gguf_file=NAME
        model = plain_model(AutoModelForCausalLM.from_pretrained(source, **kwargs, **gguf_file))
    except (OSError, ValueError) as err:  # ValueError: a config.json transformers cannot place
        raise TunelabError(f"cannot load a model from {name_or_path!r}: {one_line(err)}") from None
    if quantized:
        from tunelab.quantization import keep_standard_layout

        for module in model.modules():
            keep_standard_layout(module)
        return model
    device = resolve_device(device) if isinstance(device, str) else device
    return model.to(device)


def no_logits(device: torch.device) -> torch.Tensor:
    """A `logits_to_keep` that keeps no position: the forward pass returns its hidden states and
    runs the LM head on zero rows, for callers that compute the loss from the hidden states.

    `logits_to_keep=1` would still run the head on one position per row, and on CPU that call
    copied the whole transposed (H, V) head weight every step (BENCHMARKS.md, "No LM-head call in
    the loss forward").
    """
    return torch.empty(0, dtype=torch.long, device=device)  # (0,) positions


def final_hidden_states(model: PreTrainedModel, **inputs) -> torch.Tensor:
    """Final-norm hidden states of a forward pass on `inputs` that computes no logits: (B, T, H).
    For callers that compute their loss or head from the hidden states (chunked LM loss, reference
    log-probabilities, reward and value heads)."""
    device = inputs["input_ids"].device
    out = model(**inputs, output_hidden_states=True, logits_to_keep=no_logits(device), use_cache=False)
    return out.hidden_states[-1]


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0 (policy, reference and rollouts then agree; as TRL does)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0

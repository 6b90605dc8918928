"""Load a Hugging Face causal LM and its tokenizer, by hub id or local folder.

The same `from_pretrained` path serves a hub id and a local folder (tests and the demo use local
folders built by `tunelab.tiny`). `trust_remote_code` stays off unless the config asks for it.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
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
        source, gguf_file = gguf_source(name_or_path, tokenizer=True)  # a .gguf: converted (gguf_in)
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

    Lean: a local safetensors checkpoint stored in another dtype (float32 loaded as bfloat16) is
    read and cast tensor by tensor (`casting_reader`), so the load never holds the whole float32
    file and the cast copy at once: peak ~ weights in `dtype` + one float32 tensor.
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
        source, gguf_file = gguf_source(name_or_path)  # a .gguf: its converted folder (gguf_in)
        with ExitStack() as files:  # the safetensors files a cast reads tensor by tensor, closed after
            cast = (
                None if quantized or gguf_file or trust_remote_code else casting_reader(source, dtype, files)
            )
            if cast is not None:
                model = cast_load(source, cast, kwargs)
            else:
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


SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a local model folder in safetensors (one file, or the shards its index
    names); empty for anything else (a hub id, `.bin` weights)."""
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return []
    shards = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
    return [folder / name for name in shards]


class LazyTensors(dict):
    """name -> a not yet read safetensors slice. `from_pretrained` deep-copies its keyword
    arguments; a slice cannot be copied, and needs not be: the copy is this same mapping."""

    def __deepcopy__(self, memo):
        return self


def casting_reader(source: str, dtype: str, files: ExitStack) -> LazyTensors | None:
    """For a local safetensors folder holding floating tensors in another dtype than `dtype`: its
    tensors as slices that `pread` each tensor when transformers asks for it (opened in `files`).
    None when no cast is needed (or for anything else): then transformers' own loading, which maps
    the files and keeps tensors of the same dtype on the mapped pages, is already lean.

    Why: transformers maps every file (mmap) for the whole load; casting a float32 checkpoint to
    bfloat16 touches every page, so at the end the process holds the whole float32 file resident
    *and* the bfloat16 copy (3x the bf16 weights). Read with `pread`, each float32 tensor lives only
    until its cast: peak ~ bf16 weights + the largest float32 tensor.
    """
    folder = Path(source).expanduser()
    paths = safetensors_files(folder) if folder.is_dir() else []
    if not paths:
        return None
    wanted = SAFETENSORS_DTYPES[dtype]
    tensors = LazyTensors()
    for path in paths:
        opened = files.enter_context(safe_open(str(path), framework="pt", device="cpu", backend="pread"))
        tensors.update((name, opened.get_slice(name)) for name in opened.keys())
    stored = {piece.get_dtype() for piece in tensors.values()} & set(SAFETENSORS_DTYPES.values())
    return tensors if stored - {wanted} else None


def cast_load(source: str, tensors: LazyTensors, kwargs: dict) -> PreTrainedModel:
    """`from_pretrained` of the local folder `source` from `tensors` (`casting_reader`): the model
    class and config from the folder, the weights read and cast one tensor at a time, and the
    folder's generation config, as a load from the folder would give."""
    config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:  # transformers' own error, for the same words
        return AutoModelForCausalLM.from_pretrained(source, **kwargs)
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    model = model_class.from_pretrained(None, config=config, state_dict=tensors, **kwargs)
    model.name_or_path = model.config.name_or_path = source  # from_pretrained(None) leaves None
    if (Path(source).expanduser() / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(source)
    return model


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

"""A `.gguf` file as a model source: `model.name_or_path: path/to/model.gguf`.

transformers reads GGUF itself (`from_pretrained(folder, gguf_file=name)`): it rebuilds the config
and the tokenizer from the file's metadata and dequantises every tensor to the requested dtype, undoing
llama.cpp's layouts (rotary row order, Conv1D transposes). The model then trains like any other; the
dequantised weights are what it starts from (a q8_0 file starts from its quantised values). Which
architectures it reads is transformers' list (`GGUF_SUPPORTED_ARCHITECTURES`); among tunelab's tested
ones: Llama, Mistral, Qwen2, Phi-3, GPT-2 and Gemma 2, not Gemma (1).

Converted once. Reading a GGUF through transformers is slow: its metadata (a tokenizer's whole
vocabulary and merges) is parsed by `gguf`'s Python reader, once for the tokenizer, once for the
config and once for the weights, about 20 s for SmolLM2-135M on 2 cores before a single tensor is
dequantised. So the first use of a `.gguf` converts it into an ordinary model folder (config,
tokenizer, float32 safetensors: the dequantised values exactly) in the GGUF cache,
`$TUNELAB_GGUF_CACHE` (default `~/.cache/tunelab/gguf`), and every load after that, in this run or
a later one, in any command, reads the folder like any other local model (lean loading included:
a bfloat16 base is cast tensor by tensor). An entry is keyed by the file's absolute path, size and
modification time, and the transformers version; one process converts while the others wait
(`tunelab.disk_cache`). `TUNELAB_GGUF_CACHE=off` reads the GGUF directly every time, as does a
file not yet converted where the cache's disk lacks room for its float32 weights (checked before
converting, against 13x the file's size: the most a 2.5-bit quantisation grows to in float32).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from tunelab.console import note
from tunelab.disk_cache import locked, new_entry, publish, read_meta
from tunelab.errors import TunelabError

CACHE_ENV = "TUNELAB_GGUF_CACHE"
DEFAULT_CACHE = "~/.cache/tunelab/gguf"
OFF = ("", "0", "off", "false", "none")
CONVERSION_VERSION = 1
"""Bumped whenever what a converted folder holds changes."""
GROWTH = 13
"""Bytes of float32 weights per byte of GGUF at most (2.5 bits per weight -> 32 bits)."""


def is_gguf(name_or_path: str | Path) -> bool:
    """Whether `name_or_path` names a GGUF file (by its suffix)."""
    return str(name_or_path).lower().endswith(".gguf")


def gguf_source(name_or_path: str, tokenizer: bool = False) -> tuple[str, dict]:
    """`from_pretrained`'s (first argument, extra keyword arguments) for `name_or_path` (its model, or
    with `tokenizer` its tokenizer): a `.gguf` file becomes its converted folder in the GGUF cache
    (built at first use), or where the cache is off or full, or the folder holds no tokenizer that
    encodes like the file's, (its folder, {"gguf_file": its name}); anything else passes unchanged."""
    if not is_gguf(name_or_path):
        return name_or_path, {}
    path, root = gguf_path(name_or_path), cache_root()
    converted = converted_folder(path, root) if root is not None else None
    if converted is not None and (converted[1]["tokenizer"] or not tokenizer):
        return str(converted[0]), {}
    return str(path.parent), {"gguf_file": path.name}


def config_source(name_or_path: str) -> tuple[str, dict]:
    """`AutoConfig.from_pretrained`'s (first argument, extra keyword arguments) for `name_or_path`,
    converting nothing: a `.gguf` file already converted is read from its cache folder, any other
    from its own metadata (a few seconds); anything else passes unchanged."""
    if not is_gguf(name_or_path):
        return name_or_path, {}
    path, root = gguf_path(name_or_path), cache_root()
    if root is not None and read_meta(root / conversion_key(path), CONVERSION_VERSION) is not None:
        return str(root / conversion_key(path)), {}
    return str(path.parent), {"gguf_file": path.name}


def gguf_path(name_or_path: str) -> Path:
    """The absolute path of the GGUF file `name_or_path`; a `TunelabError` when there is none."""
    path = Path(name_or_path).expanduser().resolve()
    if not path.is_file():
        raise TunelabError(f"GGUF file {name_or_path!r} does not exist")
    return path


def cache_root() -> Path | None:
    """The GGUF cache folder (`$TUNELAB_GGUF_CACHE`, default `~/.cache/tunelab/gguf`), None when off."""
    value = os.environ.get(CACHE_ENV, DEFAULT_CACHE)
    return None if value.strip().lower() in OFF else Path(value).expanduser()


def has_room(root: Path, path: Path) -> bool:
    """Whether `root`'s disk holds `path` dequantised to float32 (`GROWTH` x its size) with room to
    spare; says so once when it does not."""
    probe = next((p for p in [root, *root.parents] if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free
    if free >= GROWTH * path.stat().st_size:
        return True
    note(
        f"[tunelab] {path.name}: the GGUF cache {root} has {free / 2**30:.1f} GiB free, too little for "
        "its float32 weights; reading the GGUF directly (slower at every load)"
    )
    return False


def conversion_key(path: Path) -> str:
    """The cache entry of `path`: its absolute path, size, modification time, transformers' version."""
    import transformers

    stat = path.stat()
    fields = [str(path), stat.st_size, stat.st_mtime_ns, transformers.__version__, CONVERSION_VERSION]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:24]


def converted_folder(path: Path, root: Path) -> tuple[Path, dict] | None:
    """(folder, its meta.json) of the model converted from the GGUF `path` in the cache `root`,
    converting it first when no finished entry exists (one process at a time); None when there is
    none and the disk has no room for one (`has_room`)."""
    turn_off = f"set {CACHE_ENV}=off to read GGUF files directly, or another folder"
    key = conversion_key(path)
    if not (root / key / "meta.json").is_file() and not has_room(root, path):
        return None
    with locked(root, key, CACHE_ENV, "GGUF cache", turn_off) as entry:
        meta = read_meta(entry, CONVERSION_VERSION)
        if meta is None:
            building = new_entry(entry)
            try:
                tokenizer = convert(path, building)
                meta = {"version": CONVERSION_VERSION, "gguf": str(path), "tokenizer": tokenizer}
                publish(building, entry, meta)
            finally:
                shutil.rmtree(building, ignore_errors=True)
            note(f"[tunelab] {path.name}: converted once to a model folder, {entry} (read from there on)")
    return entry, meta


PROBES = [
    "### Instruction:\nWhat is 4 plus 5?\n\n### Response:\n9",
    "  Leading spaces, tabs\tand   runs; accents: café, naïve; digits 12345.",
    "emoji 🙂 and CJK 你好, end.",
]


def convert(path: Path, folder: Path) -> bool:
    """Write the GGUF `path` as a model folder: config, weights dequantised by transformers to float32
    (exactly the values it loads) in safetensors, and the tokenizer where, saved and read back, it
    encodes the `PROBES` and names its special tokens as the file's does (transformers cannot
    round-trip every GGUF tokenizer: Gemma's loses its unknown token); says whether it did."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name}
    tokenizer = AutoTokenizer.from_pretrained(**source)
    saved = tokenizer.save_pretrained(folder)
    if not same_tokenizer(tokenizer, folder):
        for file in saved:
            Path(file).unlink(missing_ok=True)
    model = plain_model(AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32))
    model.save_pretrained(folder)
    return (folder / "tokenizer_config.json").is_file()


def same_tokenizer(tokenizer, folder: Path) -> bool:
    """Whether the tokenizer saved in `folder` loads, encodes the `PROBES` to `tokenizer`'s ids and has
    its special tokens and chat template."""
    from transformers import AutoTokenizer

    try:
        saved = AutoTokenizer.from_pretrained(folder)
        same_ids = all(saved(text)["input_ids"] == tokenizer(text)["input_ids"] for text in PROBES)
    except Exception:  # noqa: BLE001 - any failure to load or encode means: not the same tokenizer
        return False
    same_tokens = saved.special_tokens_map == tokenizer.special_tokens_map
    return same_ids and same_tokens and saved.chat_template == tokenizer.chat_template


def plain_model(model):
    """A model transformers loaded from a GGUF, as an ordinary model; any other model as it is.

    transformers marks a model read from GGUF as quantised by GGUF (`hf_quantizer`), even when it
    dequantised every tensor into plain layers (its path for the architectures here), and then refuses
    to save it. Once no layer is left packed, the mark is removed; a layer still packed (a newer
    transformers keeping some architectures' blocks) is a `TunelabError`, since it cannot train."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or getattr(quantizer.quantization_config, "quant_method", None) != "gguf":
        return model
    packed = [name for name, module in model.named_modules() if type(module).__name__ == "GgufLinear"]
    if packed:
        raise TunelabError(
            f"transformers kept {len(packed)} layers of the GGUF packed (e.g. {packed[0]}); tunelab trains "
            "dequantised weights only"
        )
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model

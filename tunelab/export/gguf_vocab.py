"""The tokenizer as GGUF metadata: what llama.cpp (and transformers' GGUF reader) rebuild it from.

A GGUF has no `tokenizer.json`; the tokenizer lives in `tokenizer.ggml.*` keys:

    tokenizer.ggml.model        gpt2 (byte-level BPE: GPT-2, Llama 3, Qwen2) or llama (sentencepiece-style
                                BPE with byte fallback: Llama 2, Mistral, Gemma, Phi-3)
    tokenizer.ggml.pre          the pre-tokenizer's split rule by llama.cpp's name (llama-bpe, qwen2, ...)
    tokenizer.ggml.tokens       the vocabulary, by id; rows of the embedding past it are [PAD{i}] (unused)
    tokenizer.ggml.token_type   NORMAL, CONTROL (special added tokens), USER_DEFINED (other added
                                tokens), BYTE (<0x0A>), UNKNOWN, UNUSED
    tokenizer.ggml.scores       (llama model) a score per token; -id, the merge-order proxy
    tokenizer.ggml.merges       the BPE merges, "a b"
    tokenizer.ggml.{bos,eos,unknown,padding}_token_id, add_bos_token, add_eos_token
    tokenizer.chat_template     the Jinja chat template, as in tokenizer_config.json

They are read from the fast tokenizer's own description (`tokenizer.json`); a tokenizer of another kind
(unigram, WordPiece, a slow-only tokenizer) is refused with a one-line error.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import gguf
from transformers import PreTrainedTokenizerBase

from tunelab.errors import TunelabError

# The split rules llama.cpp knows by name, as tokenizer.json writes them (the Split pre-tokenizer's regex
# before ByteLevel). Names in llama.cpp's spelling; transformers' GGUF reader maps them back.
KNOWN_SPLITS = {
    "llama-bpe": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
    "qwen2": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
        r"|\s+(?!\S)|\s+"
    ),
}
BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


@dataclass
class VocabInfo:
    """What the Modelfile needs from the tokenizer metadata."""

    model: str  # gpt2 or llama
    pre: str
    stop_tokens: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def tokenizer_description(tokenizer: PreTrainedTokenizerBase) -> dict:
    """The fast tokenizer's `tokenizer.json`, parsed; a `TunelabError` for a tokenizer without one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TunelabError(
            f"GGUF export needs a fast tokenizer (tokenizer.json); {type(tokenizer).__name__} has none"
        )
    return json.loads(backend.to_str())


def pre_tokenizer_name(description: dict) -> str:
    """llama.cpp's name of the tokenizer's split rule: gpt-2 (ByteLevel's own regex), a `KNOWN_SPLITS`
    name, or `default` when the rule has no name there (llama.cpp then uses its default split)."""
    pre = description.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for part in parts:
        if part.get("type") == "ByteLevel" and part.get("use_regex", True):
            return "gpt-2"
        if part.get("type") == "Split":
            regex = (part.get("pattern") or {}).get("Regex")
            for name, known in KNOWN_SPLITS.items():
                if regex == known:
                    return name
    return "default"


def tokenizer_kind(description: dict) -> str:
    """gpt2 (byte-level BPE) or llama (BPE with byte fallback over `▁`-spelled pieces)."""
    model = description.get("model") or {}
    if model.get("type") != "BPE":
        raise TunelabError(
            f"GGUF export writes BPE tokenizers; this tokenizer.json's model is {model.get('type')!r}"
        )
    if model.get("byte_fallback"):
        return "llama"
    if "ByteLevel" in json.dumps(description.get("pre_tokenizer")) or "ByteLevel" in json.dumps(
        description.get("decoder")
    ):
        return "gpt2"
    raise TunelabError(
        "GGUF export writes byte-level BPE or byte-fallback BPE tokenizers; this one is neither"
    )


def token_table(tokenizer: PreTrainedTokenizerBase, description: dict, rows: int, kind: str):
    """(tokens, token types) by id, padded to the embedding's `rows` with unused `[PAD{i}]` tokens."""
    vocab = tokenizer.get_vocab()
    added = {entry["id"]: entry for entry in description.get("added_tokens", [])}
    beyond = sorted(index for index in vocab.values() if index >= rows)
    if any(index not in added for index in beyond):
        raise TunelabError(
            f"the tokenizer has {len(vocab)} tokens but the model's embedding only {rows} rows"
        )
    by_id = {index: token for token, index in vocab.items() if index < rows}
    unk = (description.get("model") or {}).get("unk_token")
    tokens, types = [], []
    for index in range(rows):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif token == unk:
            tokens.append(token)
            types.append(gguf.TokenType.UNKNOWN)
        elif index in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[index]["special"] else gguf.TokenType.USER_DEFINED)
        elif kind == "llama" and BYTE_TOKEN.match(token):
            tokens.append(token)
            types.append(gguf.TokenType.BYTE)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def adds_token(tokenizer: PreTrainedTokenizerBase, token_id: int | None, position: int) -> bool:
    """Whether encoding text puts `token_id` at `position` (0: a BOS it adds, -1: an EOS)."""
    if token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[position] == token_id


def write_tokenizer(
    writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerBase, rows: int, eos_ids: list[int]
) -> VocabInfo:
    """Write the `tokenizer.*` keys; returns what the Modelfile needs (the stop tokens: EOS and the
    generation config's end-of-turn tokens)."""
    description = tokenizer_description(tokenizer)
    kind = tokenizer_kind(description)
    info = VocabInfo(model=kind, pre=pre_tokenizer_name(description) if kind == "gpt2" else "default")
    if kind == "gpt2" and info.pre == "default":
        info.notes.append(
            "the tokenizer's split rule (pre-tokenizer) has no llama.cpp name; written as 'default' "
            "(llama.cpp's default split)"
        )
    tokens, types = token_table(tokenizer, description, rows, kind)
    beyond = [token for token, index in tokenizer.get_vocab().items() if index >= rows]
    if beyond:
        info.notes.append(f"added tokens without an embedding row left out: {beyond}")
    writer.add_tokenizer_model(kind)
    writer.add_tokenizer_pre(info.pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if kind == "llama":
        writer.add_token_scores([-float(index) for index in range(rows)])
        writer.add_add_space_prefix(
            "Prepend" in json.dumps(description.get("normalizer"))
            or "Metaspace" in json.dumps(description.get("pre_tokenizer"))
        )
    merges = (description.get("model") or {}).get("merges") or []
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    special = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id,
        "pad": tokenizer.pad_token_id,
    }
    for name, token_id in special.items():
        if token_id is not None and token_id < rows:
            getattr(writer, f"add_{name}_token_id")(token_id)
    writer.add_add_bos_token(adds_token(tokenizer, tokenizer.bos_token_id, 0))
    writer.add_add_eos_token(adds_token(tokenizer, tokenizer.eos_token_id, -1))
    extra_stops = [i for i in eos_ids if i != tokenizer.eos_token_id and i < len(tokens)]
    if extra_stops:
        writer.add_eot_token_id(extra_stops[0])
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)
    info.stop_tokens = [tokens[i] for i in [tokenizer.eos_token_id, *extra_stops] if i is not None]
    return info


PROBES = [
    "### Instruction:\nReverse the words: red owl sun\n\n### Response:\nsun owl red",
    "Hello, world! It's 2026; 3.14 + 2 = 5.14 (approx.)\n\tindented  double  spaces",
    "Ünïcödé — ½ 北京 🙂",
]


def tokenization_mismatches(gguf_file: Path, tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """(probe texts split differently, probe texts): the tokenizer transformers rebuilds from the written
    file (from the same metadata llama.cpp reads) against the model's own, on `PROBES` and the chat
    template's rendering of a short conversation. A GGUF names its split rule rather than storing it,
    so a rule without a llama.cpp name tokenizes differently in every runtime that reads the file."""
    from transformers import AutoTokenizer

    rebuilt = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    texts = list(PROBES)
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        chat = [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}]
        texts.append(tokenizer.apply_chat_template(chat, tokenize=False))
    differ = sum(
        rebuilt(text, add_special_tokens=False)["input_ids"]
        != tokenizer(text, add_special_tokens=False)["input_ids"]
        for text in texts
    )
    return differ, len(texts)

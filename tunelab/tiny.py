"""Tiny language models and a locally trained tokenizer, for tests and the offline demo.

Nothing here downloads anything. A tiny model is a real Hugging Face architecture (Llama, Qwen2,
Mistral, GPT-2, Gemma, Phi-3) built from its config with random weights and saved with
`save_pretrained`, so the code under test loads it with the same `from_pretrained` call that a hub
id takes. The tokenizer is a byte-level BPE trained on a small corpus with the `tokenizers`
library, wrapped as a `PreTrainedTokenizerFast` with pad/eos tokens and a chat template.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

CONFIG_CLASSES = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "mistral": MistralConfig,
    "gpt2": GPT2Config,
    "gemma": GemmaConfig,
    "phi3": Phi3Config,
}
ARCHITECTURES = tuple(CONFIG_CLASSES)  # llama, qwen2, mistral, gpt2, gemma, phi3

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
USER, ASSISTANT, SYSTEM = "<|user|>", "<|assistant|>", "<|system|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, USER, ASSISTANT, SYSTEM]

# A minimal chat template: each turn is `<|role|>\n{content}<|eos|>\n`; the generation prompt is
# `<|assistant|>\n`. Jinja, as transformers' `apply_chat_template` expects.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|eos|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def build_tokenizer(
    corpus: Iterable[str], vocab_size: int = 512, split: Literal["whitespace", "gpt2"] = "whitespace"
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `corpus` (deterministic for a given corpus and size).

    `split`: how text is cut into words before BPE. `whitespace` makes spaces and newlines tokens of
    their own, so a word is the same token wherever it stands (after a space, a newline or at the
    start): copying tasks stay easy for tiny models. `gpt2` is GPT-2's regex, a rule GGUF runtimes
    know by name (llama.cpp, Ollama), for tests of exported files."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if split == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(r"\s"), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        additional_special_tokens=[USER, ASSISTANT, SYSTEM],
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def default_corpus() -> list[str]:
    """A small English-ish corpus with digits and punctuation, enough for a test tokenizer."""
    words = (
        "the quick brown fox jumps over a lazy dog while instruction response input context "
        "answer question reverse sort count add sum upper lower letters words numbers what is "
        "please write say hello world yes no good bad best worst chosen rejected prompt"
    ).split()
    lines = [" ".join(words[i : i + 7]) for i in range(0, len(words), 3)]
    lines += [f"{a} + {b} = {a + b}" for a in range(0, 30, 3) for b in range(0, 30, 7)]
    lines += ["### Instruction:\n", "### Input:\n", "### Response:\n", "ABCDEFGHIJKLMNOPQRSTUVWXYZ"]
    return lines


# GPT-2's config predates the names the others share; the same sizes under its own names.
GPT2_NAMES = {
    "hidden_size": "n_embd",
    "intermediate_size": "n_inner",
    "num_hidden_layers": "n_layer",
    "num_attention_heads": "n_head",
    "max_position_embeddings": "n_positions",
}


def tiny_config(
    arch: str,
    vocab_size: int,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    max_positions: int = 512,
    tie_embeddings: bool = False,
    pad_token_id: int = 0,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
) -> PretrainedConfig:
    """The config of a tiny model of architecture `arch` (one of `ARCHITECTURES`). GPT-2 has no
    grouped key/value heads (`kv_heads` does not apply to it)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {ARCHITECTURES}")
    sizes = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie_embeddings,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    if arch == "gpt2":
        return GPT2Config(**{GPT2_NAMES.get(name, name): value for name, value in sizes.items()})
    extra = {
        "mistral": {"head_dim": hidden // heads},
        "gemma": {"head_dim": hidden // heads},
        "phi3": {"original_max_position_embeddings": max_positions},
    }.get(arch, {})
    return CONFIG_CLASSES[arch](**sizes, num_key_value_heads=kv_heads, **extra)


def build_tiny_model_dir(
    out_dir: str | Path,
    arch: str = "llama",
    tokenizer: PreTrainedTokenizerFast | None = None,
    seed: int = 0,
    **sizes,
) -> Path:
    """Build a random-initialised tiny model of `arch` and save it with its tokenizer to `out_dir`.

    Returns the folder, which `AutoModelForCausalLM.from_pretrained` and
    `AutoTokenizer.from_pretrained` load like any hub model.
    """
    out_dir = Path(out_dir)
    tokenizer = tokenizer or build_tokenizer(default_corpus())
    config = tiny_config(
        arch,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **sizes,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir

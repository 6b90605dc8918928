"""Shared fixtures: tiny models of six real architectures, built offline once per session."""

from __future__ import annotations

import os
import tempfile

# Before anything imports huggingface_hub or datasets: they read these once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# GGUF files the tests load are converted into a cache of their own, not the user's home
# (tunelab.export.gguf_in); tests of the cache itself set it per test.
os.environ.setdefault("TUNELAB_GGUF_CACHE", tempfile.mkdtemp(prefix="tunelab-test-gguf-"))

import pytest  # noqa: E402
import torch  # noqa: E402

from tunelab.tiny import ARCHITECTURES, build_tiny_model_dir, build_tokenizer, default_corpus  # noqa: E402

torch.set_num_threads(1)  # tiny models: one thread avoids oversubscription overhead


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer trained locally, with pad/eos and a chat template."""
    return build_tokenizer(default_corpus())


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, tiny_tokenizer):
    """Architecture name -> folder holding a tiny random model and the tokenizer."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: build_tiny_model_dir(root / arch, arch, tiny_tokenizer, seed=0) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def llama_dir(tiny_model_dirs):
    """The tiny Llama model folder."""
    return tiny_model_dirs["llama"]


@pytest.fixture(scope="session")
def instruction_data(tmp_path_factory):
    """Small demo-style instruction files: (train.jsonl, eval.jsonl) with 96 and 24 records."""
    import json

    from tunelab.demo_data import generate

    root = tmp_path_factory.mktemp("instruction-data")
    train, held_out = generate(96, 24, seed=5)
    for name, rows in (("train", train), ("eval", held_out)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "train.jsonl", root / "eval.jsonl"

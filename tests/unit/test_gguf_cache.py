"""A `.gguf` model is converted once into a model folder in the GGUF cache (tunelab/export/gguf_in.py):
the folder holds exactly what transformers' GGUF reader loads (same logits, same tokens), later loads
read it without converting again, a changed file gets a new entry, and `TUNELAB_GGUF_CACHE=off`
or an unwritable cache behave as documented."""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import params_with_lora
from tunelab.errors import TunelabError
from tunelab.export import gguf_in
from tunelab.export.gguf_in import CACHE_ENV, gguf_source
from tunelab.export.gguf_out import export_gguf
from tunelab.models import load_model, load_tokenizer
from tunelab.tiny import build_tiny_model_dir, build_tokenizer, default_corpus

TEXT = "### Instruction:\nWhat is 4 plus 5?\n\n### Response:\n9"


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    """A tiny Llama exported as a q8_0 GGUF (a quantised file: the dequantised values are what load)."""
    root = tmp_path_factory.mktemp("gguf-cache")
    tokenizer = build_tokenizer(default_corpus(), split="gpt2")  # a split rule GGUF names
    folder = build_tiny_model_dir(root / "tiny-llama", "llama", tokenizer, seed=5)
    return export_gguf(folder, root / "out", "q8_0").gguf_file


def conversions(monkeypatch) -> list:
    """Record every conversion `gguf_source` runs."""
    calls = []
    convert = gguf_in.convert
    monkeypatch.setattr(gguf_in, "convert", lambda path, folder: (calls.append(path), convert(path, folder)))
    return calls


def test_converted_once_and_equal_to_the_direct_read(gguf_file, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    calls = conversions(monkeypatch)
    folder, extra = gguf_source(str(gguf_file))
    assert extra == {} and os.path.dirname(folder) == str(tmp_path / "cache")
    assert {"config.json", "model.safetensors", "tokenizer.json", "meta.json"} <= set(os.listdir(folder))
    cached_model, cached_tokenizer = load_model(str(gguf_file), device="cpu"), load_tokenizer(str(gguf_file))
    assert calls == [gguf_file]  # the loads after the first conversion read the folder

    monkeypatch.setenv(CACHE_ENV, "off")
    assert gguf_source(str(gguf_file)) == (str(gguf_file.parent), {"gguf_file": gguf_file.name})
    direct_model, direct_tokenizer = load_model(str(gguf_file), device="cpu"), load_tokenizer(str(gguf_file))
    assert calls == [gguf_file]
    ids = direct_tokenizer(TEXT, return_tensors="pt")["input_ids"]  # (1, T)
    assert torch.equal(cached_tokenizer(TEXT, return_tensors="pt")["input_ids"], ids)
    assert cached_tokenizer.eos_token == direct_tokenizer.eos_token
    with torch.no_grad():
        assert torch.equal(cached_model(ids).logits, direct_model(ids).logits)  # bit for bit


def test_a_changed_file_gets_a_new_entry(gguf_file, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    copy = tmp_path / "model.gguf"
    copy.write_bytes(gguf_file.read_bytes())
    calls = conversions(monkeypatch)
    first, _ = gguf_source(str(copy))
    assert gguf_source(str(copy))[0] == first and len(calls) == 1
    os.utime(copy, ns=(copy.stat().st_atime_ns, copy.stat().st_mtime_ns + 10**9))  # rewritten later
    assert gguf_source(str(copy))[0] != first and len(calls) == 2


def test_an_unwritable_cache_names_the_setting(gguf_file, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "file" / "cache"))
    with pytest.raises(
        TunelabError, match=rf"{CACHE_ENV}: cannot write the GGUF cache in .*file/cache.*=off"
    ):
        gguf_source(str(gguf_file))


def test_a_full_disk_reads_the_gguf_directly(gguf_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(gguf_in, "GROWTH", 10**15)  # no disk holds this
    assert gguf_source(str(gguf_file)) == (str(gguf_file.parent), {"gguf_file": gguf_file.name})
    assert "too little for its float32 weights" in capsys.readouterr().out
    assert not (tmp_path / "cache").exists()
    monkeypatch.setattr(gguf_in, "GROWTH", 1)
    folder, _ = gguf_source(str(gguf_file))  # converted while there was room
    monkeypatch.setattr(gguf_in, "GROWTH", 10**15)
    assert gguf_source(str(gguf_file)) == (folder, {})  # a full disk does not bypass a finished entry


def test_a_tokenizer_that_does_not_round_trip_is_read_from_the_gguf(gguf_file, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(gguf_in, "same_tokenizer", lambda tokenizer, folder: False)
    folder, _ = gguf_source(str(gguf_file))
    assert not (tmp_path / "cache" / os.path.basename(folder) / "tokenizer_config.json").exists()
    assert gguf_source(str(gguf_file), tokenizer=True) == (
        str(gguf_file.parent),
        {"gguf_file": gguf_file.name},
    )
    assert load_tokenizer(str(gguf_file)).eos_token is not None  # read from the file itself


def test_the_round_trip_check_sees_another_encoding(gguf_file, tmp_path):
    tokenizer = load_tokenizer(str(gguf_file))
    tokenizer.save_pretrained(tmp_path / "saved")
    assert gguf_in.same_tokenizer(tokenizer, tmp_path / "saved")
    tokenizer.chat_template = "{{ messages }}"
    assert not gguf_in.same_tokenizer(tokenizer, tmp_path / "saved")
    assert not gguf_in.same_tokenizer(tokenizer, tmp_path / "nothing there")


def test_inspect_reads_a_gguf_without_converting_it(gguf_file, tmp_path, monkeypatch, capsys):
    """`tunelab inspect` of a config naming a `.gguf` reads its architecture from the file's metadata
    (no conversion, no weights), or from its converted folder once there is one: the same counts as
    the model itself."""
    from tunelab.cli import main

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    calls = conversions(monkeypatch)
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {{name_or_path: {gguf_file}}}\nmethod: {{name: lora, r: 4, target_modules: all-linear}}\n"
        "data: {train: unused.jsonl, max_length: 16}\n"
    )
    model = load_model(str(gguf_file), device="cpu")
    total = params_with_lora(model, r=4)
    assert calls == [gguf_file]  # the load converted it
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "another-cache"))
    for _ in range(2):  # not converted in this cache, then (still) not: inspect converts nothing
        assert main(["inspect", str(config)]) == 0
        out = capsys.readouterr().out
        assert f"all params: {total:,}" in out  # the model's, plus r (in + out) per linear layer
        assert "expected peak memory per device:" in out
    assert calls == [gguf_file] and not (tmp_path / "another-cache").exists()
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    assert gguf_in.config_source(str(gguf_file)) == (
        str(next((tmp_path / "cache").glob("*/meta.json")).parent),
        {},
    )

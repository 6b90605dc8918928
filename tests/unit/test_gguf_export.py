"""GGUF export and import (tunelab/export/): files read back by transformers' own GGUF reader (an
independent implementation of llama.cpp's layouts) give the Hugging Face model's logits.

What transformers 5.24's reader supports decides what is compared end to end: Llama, Mistral (read
back as Llama: the same computation), Qwen2, Phi-3, Gemma 2 and GPT-2. Its GPT-2 reader ignores
`n_inner` and `n_positions`, so the tiny GPT-2 here has GPT-2's own 4x MLP and 1024 positions; its
Gemma 2 reader reads no `query_pre_attn_scalar` nor softcaps, so the tiny Gemma 2 has their defaults.
It cannot read Gemma (1) at all: Gemma's file is checked tensor by tensor against the hand-stated
layout instead.

The tokenizer of these models splits text with GPT-2's own rule, one llama.cpp names ("gpt-2"): a
GGUF stores the split rule by name only, so a tokenizer with a rule llama.cpp has no name for (the
suite's default tiny tokenizer) cannot round-trip exactly, which the export says in a note.
"""

from __future__ import annotations

import json
import re

import gguf
import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma2Config, PreTrainedTokenizerFast
from transformers.pytorch_utils import Conv1D

import tunelab
from tests.helpers import sft_config
from tunelab.cli import main
from tunelab.errors import TunelabError
from tunelab.export.gguf_in import gguf_source
from tunelab.export.gguf_out import export_gguf
from tunelab.export.gguf_tensors import interleave_rotary
from tunelab.export.modelfile import measure_chat_template, render_pieces
from tunelab.merging import merge_adapter
from tunelab.models import check_model_source, load_model, load_tokenizer
from tunelab.tiny import (
    BOS,
    CHAT_TEMPLATE,
    EOS,
    PAD,
    build_tiny_model_dir,
    build_tokenizer,
    default_corpus,
)
from tunelab.trained import load_trained

READ_BACK = ["llama", "mistral", "qwen2", "phi3", "gpt2", "gemma2"]  # what transformers' GGUF reader loads
TEXTS = [
    "the quick brown fox jumps over 12 + 3 = 15\n### Response:\nhello world",
    "### Instruction:\nWhat is 4 plus 5?\n\n### Response:\n9",
    "<|user|>\nsay hello<|eos|>\n<|assistant|>\n",
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Architecture -> tiny model folder (GPT-2 sized as its GGUF reader assumes; Gemma tied)."""
    root = tmp_path_factory.mktemp("gguf-models")
    tokenizer = build_tokenizer(default_corpus(), split="gpt2")  # a split rule GGUF knows by name
    sizes = {"gpt2": {"intermediate": 256, "max_positions": 1024}, "gemma": {"tie_embeddings": True}}
    folders = {
        arch: build_tiny_model_dir(root / f"tiny-{arch}", arch, tokenizer, seed=3, **sizes.get(arch, {}))
        for arch in [*READ_BACK, "gemma"]
        if arch != "gemma2"
    }
    folders["gemma2"] = tiny_gemma2(root / "tiny-gemma2", tokenizer)
    return folders


def tiny_gemma2(folder, tokenizer):
    """Gemma 2 (not in tunelab.tiny): head_dim = query_pre_attn_scalar = 256, as in Gemma 2 2B/9B and
    as transformers' GGUF reader assumes (it reads neither); the softcaps at their defaults, which the
    reader also assumes; 2 layers, one sliding and one global."""
    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=256,
        query_pre_attn_scalar=256,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(3)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def read_back(path):
    """The GGUF loaded by transformers' reader, through tunelab's loader: (model, tokenizer)."""
    return load_model(str(path), device="cpu"), load_tokenizer(str(path))


def rounded_like_the_file(model: nn.Module, file_type: str) -> nn.Module:
    """`model` with every matrix rounded as the file stores it (norms and biases stay float32): what
    the GGUF computes. q8_0 blocks run along GGUF rows, so GPT-2's Conv1D (in, out) weights are rounded
    transposed."""
    qtype = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16}.get(file_type)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim < 2:
                continue
            if file_type == "f16":
                p.copy_(p.half().float())
            elif file_type == "bf16":
                p.copy_(p.bfloat16().float())
            elif file_type == "q8_0":
                conv = isinstance(model.get_submodule(name.rsplit(".", 1)[0]), Conv1D)
                rows = (p.T if conv else p).contiguous().numpy()
                q8 = gguf.GGMLQuantizationType.Q8_0
                values = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(rows, q8), q8))
                p.copy_(values.T if conv else values)
    assert qtype is not None or file_type in ("f32", "q8_0")
    return model


@pytest.mark.parametrize("arch", READ_BACK)
@pytest.mark.parametrize("file_type", ["f32", "f16", "bf16", "q8_0"])
def test_exported_file_reads_back_with_the_models_logits(models, arch, file_type, tmp_path):
    exported = export_gguf(models[arch], tmp_path, file_type)
    model, tokenizer = read_back(exported.gguf_file)
    reference = AutoModelForCausalLM.from_pretrained(models[arch])
    original_tokenizer = load_tokenizer(str(models[arch]))
    ids = original_tokenizer(TEXTS[0], return_tensors="pt")["input_ids"]  # (1, T)
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == original_tokenizer(text)["input_ids"]
    with torch.no_grad():
        want = reference(ids).logits  # (1, T, V)
        got = model(ids).logits
        exact = rounded_like_the_file(reference, file_type)(ids).logits
    # the file computes what the model with its weights rounded to the storage type computes...
    torch.testing.assert_close(got, exact, atol=2e-5, rtol=1e-4)
    # ...which is within the format's precision of the original
    tolerance = {"f32": 1e-5, "f16": 2e-3, "bf16": 1.5e-2, "q8_0": 3e-2}[file_type]
    assert (got - want).abs().max().item() < tolerance
    assert exported.notes == [] or arch == "qwen2"  # Qwen2's tokenizer class adds an unk beyond the rows


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_greedy_generation_of_an_f16_file_equals_the_models(models, arch, tmp_path):
    exported = export_gguf(models[arch], tmp_path, "f16")
    model, tokenizer = read_back(exported.gguf_file)
    reference = AutoModelForCausalLM.from_pretrained(models[arch])
    ids = tokenizer("### Instruction:\nreverse: red owl\n\n### Response:\n", return_tensors="pt")["input_ids"]
    kwargs = dict(max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    assert model.generate(ids, **kwargs).tolist() == reference.generate(ids, **kwargs).tolist()


def gguf_tensors(path) -> dict[str, np.ndarray]:
    reader = gguf.GGUFReader(path)
    return {t.name: np.array(t.data) for t in reader.tensors}


def test_lora_export_equals_the_export_of_its_merge(models, tmp_path):
    from tunelab.merging import merge_adapter
    from tunelab.methods import lora

    base = models["llama"]
    model = AutoModelForCausalLM.from_pretrained(base)
    options = lora.Options(r=4, alpha=8, target_modules="all-linear")
    lora.apply(model, options)
    torch.manual_seed(0)
    for layer in lora.lora_layers(model).values():
        nn.init.normal_(layer.lora_B.weight, std=0.05)  # a zero B would make the adapter the identity
    lora.save(model, options, tmp_path / "adapter", str(base))

    from_adapter = export_gguf(tmp_path / "adapter", tmp_path / "a", "f32")
    merged = merge_adapter(tmp_path / "adapter", tmp_path / "merged")
    from_merge = export_gguf(merged, tmp_path / "m", "f32")
    from_base = export_gguf(base, tmp_path / "b", "f32")
    adapter_tensors, merged_tensors = gguf_tensors(from_adapter.gguf_file), gguf_tensors(from_merge.gguf_file)
    assert adapter_tensors.keys() == merged_tensors.keys()
    for name in adapter_tensors:
        np.testing.assert_array_equal(adapter_tensors[name], merged_tensors[name])
    base_q = gguf_tensors(from_base.gguf_file)["blk.0.attn_q.weight"]
    assert np.abs(adapter_tensors["blk.0.attn_q.weight"] - base_q).max() > 1e-3


def test_interleave_rotary_by_hand():
    """One head of d=4 (rows 0..3): Hugging Face pairs (0, 2), (1, 3); llama.cpp pairs adjacent rows,
    so the rows go 0, 2, 1, 3. Two heads: each reordered within itself."""
    rows = torch.arange(8.0).reshape(8, 1)
    assert interleave_rotary(rows, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert interleave_rotary(torch.arange(4.0), 1).tolist() == [0, 2, 1, 3]  # a bias


def test_gemma_file_layout(models, tmp_path):
    """transformers cannot read Gemma (1) GGUFs; the layout is checked against the model directly:
    names, norms as 1 + w, no separate head, f32 1-D tensors, head_dim keys."""
    exported = export_gguf(models["gemma"], tmp_path, "f32")
    reader = gguf.GGUFReader(exported.gguf_file)
    tensors = {t.name: t for t in reader.tensors}
    model = AutoModelForCausalLM.from_pretrained(models["gemma"])
    norm = model.model.layers[1].post_attention_layernorm.weight.detach().numpy()
    np.testing.assert_array_equal(np.array(tensors["blk.1.ffn_norm.weight"].data), norm + 1)
    q = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    np.testing.assert_array_equal(np.array(tensors["blk.0.attn_q.weight"].data), q)  # NeoX-style: as is
    assert "output.weight" not in tensors and "output_norm.weight" in tensors
    assert reader.fields["general.architecture"].contents() == "gemma"
    assert reader.fields["gemma.attention.key_length"].contents() == 16
    untied = build_tiny_model_dir(tmp_path / "untied", "gemma", load_tokenizer(str(models["gemma"])))
    with pytest.raises(TunelabError, match="no separate LM head"):
        export_gguf(untied, tmp_path / "u", "f16")


def test_tokenizer_metadata_and_modelfile(models, tmp_path):
    exported = export_gguf(models["llama"], tmp_path, "q8_0")
    reader = gguf.GGUFReader(exported.gguf_file)
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    tokenizer = load_tokenizer(str(models["llama"]))
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    assert field("tokenizer.ggml.tokens") == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    types = field("tokenizer.ggml.token_type")
    assert types[tokenizer.eos_token_id] == gguf.TokenType.CONTROL and types[100] == gguf.TokenType.NORMAL
    assert field("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert field("tokenizer.ggml.merges") == [" ".join(merge) for merge in merges]
    assert field("tokenizer.chat_template") == CHAT_TEMPLATE
    assert field("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert tensor_type(reader, "blk.0.attn_q.weight") == gguf.GGMLQuantizationType.Q8_0
    assert tensor_type(reader, "blk.0.attn_norm.weight") == gguf.GGMLQuantizationType.F32

    modelfile = exported.modelfile.read_text()
    assert modelfile.startswith(f"FROM ./{exported.gguf_file.name}\n")
    assert 'PARAMETER stop "<|eos|>"' in modelfile
    assert '{{- else if eq .Role "user" -}}\n{{ "<|user|>\\n" }}{{ .Content }}{{ "<|eos|>\\n" }}' in modelfile
    assert '{{- if and $last (ne .Role "assistant") }}{{ "<|assistant|>\\n" }}{{- end }}' in modelfile


def tensor_type(reader, name):
    return next(t.tensor_type for t in reader.tensors if t.name == name)


def test_chat_template_measurement_reproduces_the_jinja(models):
    tokenizer = load_tokenizer(str(models["llama"]))
    pieces = measure_chat_template(tokenizer)
    assert pieces.before == {"user": "<|user|>\n", "assistant": "<|assistant|>\n", "system": "<|system|>\n"}
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert render_pieces(pieces, messages, True) == tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    # a template that folds the system prompt into the first user turn is not a per-message wrapping
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
        "{% if loop.index0 == 1 and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }} {% endif %}"
        "{{ m['content'] }} [/INST]{% elif m['role'] == 'assistant' %}{{ m['content'] }}</s>{% endif %}{% endfor %}"
    )
    assert measure_chat_template(tokenizer) is None


def test_untranslatable_pre_tokenizer_is_noted(llama_dir, tmp_path):
    exported = export_gguf(llama_dir, tmp_path, "f16")
    assert "split rule (pre-tokenizer) has no llama.cpp name" in exported.notes[0]
    assert re.search(r"splits [1-4] of 4 probe texts into other tokens", exported.notes[1])


def test_gguf_base_trains_and_its_export_round_trips(models, instruction_data, tmp_path):
    base = export_gguf(models["qwen2"], tmp_path / "base", "f32").gguf_file
    check_model_source(str(base))  # accepted as a local path
    assert gguf_source(str(base))[1] == {}  # converted once into the GGUF cache (test_gguf_cache.py)
    run = tmp_path / "run"
    tunelab.train(sft_config(base, instruction_data[0], run, "train.max_steps=3"))
    exported = export_gguf(run, None, "f32")
    assert exported.gguf_file == run / "gguf" / "run-f32.gguf"
    model, _ = read_back(exported.gguf_file)
    trained = AutoModelForCausalLM.from_pretrained(run / "final")
    before = AutoModelForCausalLM.from_pretrained(models["qwen2"])
    ids = torch.tensor([[5, 17, 40, 2, 99, 7]])
    with torch.no_grad():
        got, want = model(ids).logits, trained(ids).logits  # (1, 6, V)
        assert (want - before(ids).logits).abs().max() > 1e-3  # the run changed the model
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (run / "gguf" / "README.md").is_file() and (run / "gguf" / "Modelfile").is_file()
    lora_run = tmp_path / "lora"  # a LoRA on the GGUF base merges like any other
    lora = {"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"}
    tunelab.train(sft_config(base, instruction_data[0], lora_run, "train.max_steps=3", method=lora))
    merged = AutoModelForCausalLM.from_pretrained(merge_adapter(lora_run, tmp_path / "merged"))
    adapted, _, _ = load_trained(lora_run, device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-5, rtol=1e-5)


def test_missing_gguf_and_unsupported_sources_are_one_line(models, tmp_path, capsys):
    with pytest.raises(TunelabError, match="does not exist"):
        gguf_source(str(tmp_path / "nope.gguf"))
    assert main(["export", str(tmp_path / "nope"), "--type", "q8_0"]) == 2
    from tunelab.methods import prefix

    model = AutoModelForCausalLM.from_pretrained(models["llama"])
    options = prefix.Options(num_virtual_tokens=2)
    prefix.apply(model, options)
    prefix.save(model, options, tmp_path / "prefix", str(models["llama"]))
    assert main(["export", str(tmp_path / "prefix")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "not a weight delta" in err[1]
    assert main(["export", str(models["phi3"]), "--type", "bf16", "--out", str(tmp_path / "x.gguf")]) == 0
    assert (tmp_path / "x.gguf").is_file() and "ollama create" in capsys.readouterr().out
    assert AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="x.gguf").eos_token == EOS


def test_llama3_rotary_scaling_is_written_as_frequency_divisors(models, tmp_path):
    """Llama 3.1's rotary scaling (factor 8, low/high frequency factors 1 and 4, original context 64
    here): llama.cpp divides frequency i by rope_freqs[i]. With head_dim 16 and base 10^4 the
    wavelengths are 2 pi 10^(k / 2), k = 0..7: 6.3 is below 64/4 = 16 (kept: divisor 1); 19.9 and 62.8
    lie between 16 and 64/1 = 64 (smoothed: s = (64 / wavelength - 1) / (4 - 1), divisor
    1 / ((1 - s) / 8 + s)); the rest exceed 64 (divided by 8). The model's own rotary buffer must equal
    the plain frequencies divided by the file's divisors."""
    config = AutoModelForCausalLM.from_pretrained(models["llama"]).config
    config.rope_parameters = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "scaled")
    load_tokenizer(str(models["llama"])).save_pretrained(tmp_path / "scaled")
    exported = export_gguf(tmp_path / "scaled", tmp_path / "out", "f16")
    divisors = gguf_tensors(exported.gguf_file)["rope_freqs.weight"]
    s1, s2 = ((64 / (2 * np.pi * 10 ** (k / 2)) - 1) / 3 for k in (1, 2))
    smoothed = [1 / ((1 - s) / 8 + s) for s in (s1, s2)]
    np.testing.assert_allclose(divisors, [1, *smoothed, 8, 8, 8, 8, 8], rtol=1e-5)
    plain = 1.0 / 10000 ** (np.arange(0, 16, 2) / 16)
    np.testing.assert_allclose(model.model.rotary_emb.inv_freq.numpy(), plain / divisors, rtol=1e-5)
    config.rope_parameters = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "yarn")
    load_tokenizer(str(models["llama"])).save_pretrained(tmp_path / "yarn")
    with pytest.raises(TunelabError, match="rope_type='yarn'"):
        export_gguf(tmp_path / "yarn", tmp_path / "y", "f16")


def sentencepiece_style_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-2-style tokenizer, trained locally: BPE over `▁`-spelled pieces with byte fallback
    (`<0x00>`..`<0xFF>` in the vocabulary), as Llama 2, Mistral, Gemma and Phi-3 ship theirs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = metaspace
    learner.train_from_iterator(default_corpus(), trainers.BpeTrainer(vocab_size=300, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    specials = ["<unk>", BOS, EOS, PAD]
    vocab = {token: i for i, token in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for token in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True)
    )
    tok.pre_tokenizer = metaspace
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token=BOS, eos_token=EOS, pad_token=PAD
    )


def test_sentencepiece_style_tokenizer_round_trips(tmp_path):
    folder = build_tiny_model_dir(tmp_path / "spm", "llama", sentencepiece_style_tokenizer(), seed=0)
    exported = export_gguf(folder, tmp_path / "out", "f16")
    assert exported.notes == []
    reader = gguf.GGUFReader(exported.gguf_file)
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    tokens, types = (reader.fields[f"tokenizer.ggml.{key}"].contents() for key in ("tokens", "token_type"))
    assert tokens[4 + 0x0A] == "<0x0A>" and types[4 + 0x0A] == gguf.TokenType.BYTE
    assert types[0] == gguf.TokenType.UNKNOWN and types[1] == gguf.TokenType.CONTROL
    assert types[300] == gguf.TokenType.NORMAL
    original, rebuilt = load_tokenizer(str(folder)), load_tokenizer(str(exported.gguf_file))
    for text in [*TEXTS, "Ünïcödé 北京 🙂", "  two spaces"]:
        assert rebuilt(text)["input_ids"] == original(text)["input_ids"]

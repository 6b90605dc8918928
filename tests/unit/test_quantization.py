"""Quantised bases (QLoRA) with bitsandbytes on CPU: loading, LoRA/DoRA training, PEFT files, merge.

- a quantised layer computes x W^T + b with W its dequantised weight (4-bit NF4 and FP4, 8-bit),
  W is close to the full-precision weight, and embeddings and the LM head stay unquantised;
- 4- and 8-bit Llama and Qwen2 bases train LoRA and DoRA: the loss falls and only A, B (and m)
  change, the quantised weights stay byte for byte;
- the reference policy is the same quantised model with the adapter off (no copy);
- QLoRA adapter files are those of the unquantised case: PEFT loads tunelab's on the
  full-precision base and on a bitsandbytes-quantised one, tunelab loads PEFT's (LoRA and DoRA),
  with equal logits (randomised adapter weights);
- recipes: an SFT run (4-bit base, LoRA, gradient checkpointing) and a DPO run through the real
  objectives; `tunelab merge` of the SFT run folds the adapter into the full-precision base;
- configs: `full`/`partial` on a quantised base is a config error; without bitsandbytes the error
  says what to install.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
import sys
from pathlib import Path

import bitsandbytes as bnb  # the `quant` extra; part of the `test` extra, never skipped
import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import tunelab
from tests.helpers import rlhf_config, sft_config
from tunelab.config import QuantizationConfig, load_config
from tunelab.errors import ConfigError, TunelabError
from tunelab.merging import merge_adapter
from tunelab.methods import lora, trainable_parameters
from tunelab.models import load_model
from tunelab.quantization import dequantized_weight, is_quantized, keep_standard_layout, quantized_kind
from tunelab.reference import Reference
from tunelab.training.metrics import read_metrics

NF4 = QuantizationConfig(bits=4, quant_type="nf4", double_quant=True)
QUANTIZATIONS = {
    "nf4": NF4,
    "fp4": QuantizationConfig(bits=4, quant_type="fp4"),
    "int8": QuantizationConfig(bits=8),
}
ROOT = Path(__file__).resolve().parents[2]
IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11], [9, 8, 7, 6, 5, 4, 3, 2]])  # (B, T)
ADAPTER_MARKERS = (".lora_A.", ".lora_B.", "lora_magnitude_vector")


def load_quantized(model_dir, name: str = "nf4") -> torch.nn.Module:
    return load_model(str(model_dir), device="cpu", quantization=QUANTIZATIONS[name]).eval()


def load_full(model_dir) -> torch.nn.Module:
    return load_model(str(model_dir), device="cpu").eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits  # (B, T, V)


def randomise(model: torch.nn.Module, seed: int = 1) -> int:
    """Perturb A, B (and DoRA's m): B = 0 would pass every interop check trivially."""
    gen = torch.Generator().manual_seed(seed)
    touched = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(m in name for m in ADAPTER_MARKERS):
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
                touched += 1
    return touched


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, copied (quantised weights as their packed bytes)."""
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    return {n: t.detach().clone() for n, t in tensors.items()}


@pytest.mark.parametrize("name", list(QUANTIZATIONS))
def test_quantized_layers_compute_with_their_dequantized_weights(tiny_model_dirs, name):
    model_dir = tiny_model_dirs["qwen2"]  # q/k/v carry biases
    model = load_quantized(model_dir, name)
    full = dict(load_full(model_dir).named_modules())
    kind = "4bit" if QUANTIZATIONS[name].bits == 4 else "8bit"
    quantized = {n: m for n, m in model.named_modules() if quantized_kind(m) is not None}
    assert len(quantized) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    assert not isinstance(model.lm_head, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    assert model.lm_head.weight.dtype == model.model.embed_tokens.weight.dtype == torch.float32
    torch.manual_seed(0)  # the inputs; an unseeded draw made the int8 case depend on test order
    for module_name, layer in quantized.items():
        x = 0.5 * torch.randn(3, 5, layer.in_features)
        assert quantized_kind(layer) == kind
        weight = dequantized_weight(layer)  # (out, in)
        original = full[module_name].weight
        assert weight.shape == original.shape
        # Quantisation error: at most half a code step of the row's / block's absmax scale.
        step = 0.2 if QUANTIZATIONS[name].bits == 4 else 1 / 127
        assert (weight - original).abs().max() <= step * original.abs().max()
        with torch.no_grad():
            if kind == "4bit":  # dequantised to compute_dtype, then one float32 matmul
                expected = torch.nn.functional.linear(x, weight, layer.bias)
            else:
                expected = int8_reference(layer, x)
            torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)


def int8_reference(layer, x: torch.Tensor) -> torch.Tensor:
    """LLM.int8() (Dettmers et al. 2022) without outliers: the input, cast to float16, is quantised
    per row too, x_q = round(127 x / a) with a = max_j |x_j|, and y = (x_q C^T) a s / 127^2 + b,
    where C (out, in) int8 and s (out,) are the stored weight rows and their absmax scales."""
    assert x.abs().max() < layer.state.threshold  # no outlier column: all of x goes through int8
    x = x.half().float()
    a = x.abs().amax(dim=-1, keepdim=True)  # (..., 1)
    codes = torch.round(127 * x / a)  # (..., in)
    scales = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB  # (out,)
    y = (codes @ layer.weight.data.float().T) * a * scales.float() / 127**2  # (..., out)
    return y if layer.bias is None else y + layer.bias


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_quantized_base_trains_lora_and_dora(tiny_model_dirs, arch, use_dora, bits):
    model = load_quantized(tiny_model_dirs[arch], "nf4" if bits == 4 else "int8")
    lora.apply(model, lora.Options(r=4, alpha=8, target_modules="all-linear", use_dora=use_dora))
    layers = lora.lora_layers(model)
    assert layers and all(layer.quantized == f"{bits}bit" for layer in layers.values())
    trainable = trainable_parameters(model)
    assert set(trainable) == {n for n, _ in model.named_parameters() if any(m in n for m in ADAPTER_MARKERS)}
    assert all(p.dtype == torch.float32 for p in trainable.values())
    before = snapshot(model)
    model.train()
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    after = snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == set(trainable)


def test_reference_is_the_quantized_base_with_the_adapter_off(tiny_model_dirs):
    model_dir = tiny_model_dirs["llama"]
    base = logits(load_quantized(model_dir))
    model = load_quantized(model_dir)
    lora.apply(model, lora.Options(r=4, alpha=8, target_modules="all-linear", use_dora=True))
    randomise(model)
    adapted = logits(model)
    assert (adapted - base).abs().max() > 1e-3
    reference = Reference(model, lora)
    assert reference.copy is None
    with reference.model() as ref:
        assert ref is model and is_quantized(ref)
        torch.testing.assert_close(logits(ref), base, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model), adapted, rtol=0, atol=0)


def test_quantized_layers_do_not_merge(tiny_model_dirs):
    model = load_quantized(tiny_model_dirs["llama"])
    lora.apply(model, lora.Options(r=4, alpha=8))
    with pytest.raises(TunelabError, match="tunelab merge"):
        lora.merge(model)


@functools.cache
def _peft_bnb_config(bits: int) -> BitsAndBytesConfig:
    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def peft_quantized_base(model_dir, bits: int) -> torch.nn.Module:
    """A bitsandbytes-quantised base loaded as PEFT users load one (transformers' own call)."""
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=_peft_bnb_config(bits), dtype=torch.float32, device_map="cpu"
    ).eval()
    for module in model.modules():  # float32 matmuls, as tunelab's (tunelab.quantization)
        keep_standard_layout(module)
    return model


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_qlora_adapter_loads_in_peft_on_quantized_and_full_bases(tiny_model_dirs, tmp_path, use_dora):
    model_dir = tiny_model_dirs["llama"]
    options = lora.Options(r=4, alpha=8, target_modules="all-linear", use_dora=use_dora)
    model = load_quantized(model_dir)
    lora.apply(model, options)
    assert randomise(model)
    expected_quantized = logits(model)
    lora.save(model, options, tmp_path / "qlora", str(model_dir))

    # The same files as an unquantised run's: same config, same keys and shapes.
    plain = load_full(model_dir)
    lora.apply(plain, options)
    lora.save(plain, options, tmp_path / "plain", str(model_dir))
    config = json.loads((tmp_path / "qlora" / "adapter_config.json").read_text())
    assert config == json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    saved, plain_saved = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("qlora", "plain"))
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in plain_saved.items()}

    theirs = peft.PeftModel.from_pretrained(peft_quantized_base(model_dir, 4), tmp_path / "qlora").eval()
    torch.testing.assert_close(logits(theirs), expected_quantized, rtol=0, atol=1e-5)

    expected_full = load_full(model_dir)
    lora.load(expected_full, tmp_path / "qlora")
    theirs_full = peft.PeftModel.from_pretrained(load_full(model_dir), tmp_path / "qlora").eval()
    torch.testing.assert_close(logits(theirs_full), logits(expected_full), rtol=0, atol=1e-5)
    assert (logits(expected_full) - expected_quantized).abs().max() > 0  # the base differs, the adapter not


@pytest.mark.parametrize(
    ("bits", "use_dora"), [(4, False), (4, True), (8, False)], ids=["4bit", "4bit-dora", "8bit"]
)
def test_peft_qlora_adapter_loads_in_tunelab(tiny_model_dirs, tmp_path, bits, use_dora):
    model_dir = tiny_model_dirs["qwen2"]
    theirs = peft.get_peft_model(
        peft_quantized_base(model_dir, bits),
        peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=use_dora
        ),
    )
    assert randomise(theirs) == (3 if use_dora else 2) * 3 * 2
    expected = logits(theirs.eval())
    theirs.save_pretrained(tmp_path / "adapter")
    ours = load_quantized(model_dir, "nf4" if bits == 4 else "int8")
    lora.load(ours, tmp_path / "adapter")
    assert all(layer.quantized == f"{bits}bit" for layer in lora.lora_layers(ours).values())
    torch.testing.assert_close(logits(ours), expected, rtol=0, atol=1e-5)


def test_full_and_partial_on_a_quantized_base_are_config_errors(tiny_model_dirs, tmp_path):
    model = {"name_or_path": str(tiny_model_dirs["llama"]), "quantization": {"bits": 4}}
    for method in ({"name": "full"}, {"name": "partial", "last_layers": 1}):
        with pytest.raises(ConfigError, match=r"model\.quantization\.bits: cannot train method\.name"):
            load_config(model=model, method=method, data={"train": "x.jsonl"})
    with pytest.raises(ConfigError, match=r"model\.quantization\.bits"):
        load_config(model={**model, "quantization": {"bits": 3}}, data={"train": "x.jsonl"})
    config = load_config(model=model, method={"name": "lora", "use_dora": True}, data={"train": "x.jsonl"})
    assert config.model.quantization == QuantizationConfig(bits=4)


def test_without_bitsandbytes_the_error_says_what_to_install(llama_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    with pytest.raises(TunelabError, match=r"needs bitsandbytes: pip install 'tunelab\[quant\]'"):
        load_model(str(llama_dir), device="cpu", quantization=NF4)


def record_loaded_models(monkeypatch) -> list:
    """The models a run loads (through `tunelab.trained`, which passes `model.quantization` on)."""
    loaded = []

    def load(*args, **kwargs):
        loaded.append(load_model(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr("tunelab.trained.load_model", load)
    return loaded


@pytest.fixture(scope="module")
def qlora_sft_run(tiny_model_dirs, instruction_data, tmp_path_factory):
    """A 4-bit QLoRA SFT run (gradient checkpointing on) through the real recipe: (folder, summary, models)."""
    out = tmp_path_factory.mktemp("qlora") / "run"
    method = {"name": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear"}
    config = sft_config(
        tiny_model_dirs["llama"],
        instruction_data[0],
        out,
        "train.max_steps=8",
        "model.quantization.bits=4",
        "model.quantization.double_quant=true",
        "model.gradient_checkpointing=true",
        "eval.generate=false",
        "train.save_every=4",
        method=method,
    )
    with pytest.MonkeyPatch.context() as monkeypatch:
        loaded = record_loaded_models(monkeypatch)
        summary = tunelab.train(config)
    return out, summary, loaded, config


def test_sft_recipe_trains_lora_on_a_4bit_base(qlora_sft_run):
    out, _, loaded, _ = qlora_sft_run
    assert loaded and all(is_quantized(m) for m in loaded)
    assert loaded[0].is_gradient_checkpointing
    history = [row["loss"] for row in read_metrics(out)]
    assert len(history) == 8 and sum(history[-3:]) / 3 < sum(history[:3]) / 3
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and not (out / "final" / "model.safetensors").exists()


def test_qlora_run_resumes_exactly(qlora_sft_run, tmp_path):
    """The run, copied without its end (final/), resumes from its step-4 checkpoint and logs the
    same losses for steps 5-8."""
    out, _, _, config = qlora_sft_run
    cut = tmp_path / "cut"
    shutil.copytree(out, cut)
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step-4"]
    rows = [{**row, "copied": True} for row in read_metrics(out)]  # kept only by a resumed run
    (cut / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    shutil.rmtree(cut / "final")
    config = dataclasses.replace(
        config, output_dir=str(cut), train=dataclasses.replace(config.train, resume=True)
    )
    tunelab.train(config)
    assert [(r["step"], "copied" in r) for r in read_metrics(cut)] == [(s, s <= 4) for s in range(1, 9)]
    assert [r["loss"] for r in read_metrics(cut)] == pytest.approx(
        [r["loss"] for r in read_metrics(out)], rel=1e-6
    )


def test_merge_of_a_qlora_run_folds_into_the_full_precision_base(
    qlora_sft_run, tiny_model_dirs, tmp_path, capsys
):
    out, _, _, _ = qlora_sft_run
    expected = load_full(tiny_model_dirs["llama"])
    lora.load(expected, out / "final")
    merge_adapter(out, tmp_path / "merged")
    assert "4-bit quantised base: merging into the full-precision base" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not is_quantized(merged) and merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    torch.testing.assert_close(logits(merged), logits(expected), rtol=0, atol=1e-5)
    assert (logits(merged) - logits(load_full(tiny_model_dirs["llama"]))).abs().max() > 1e-3  # B != 0


def test_dpo_recipe_on_a_4bit_base_uses_it_as_the_reference(llama_dir, tmp_path, monkeypatch):
    """With the reference = the quantised base with LoRA off, the first DPO loss is exactly log 2."""
    method = {"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"}
    config = rlhf_config(
        llama_dir,
        tmp_path / "dpo",
        ["model.quantization.bits=4"],
        {"name": "dpo", "beta": 0.1},
        ROOT / "data" / "rlhf" / "preference_train.jsonl",
        method=method,
        train={"max_steps": 3, "batch_size": 8, "lr": 3e-3},
    )
    loaded = record_loaded_models(monkeypatch)
    tunelab.train(config)
    assert len(loaded) == 1 and is_quantized(loaded[0])  # one model: no reference copy
    losses = [row["loss"] for row in read_metrics(tmp_path / "dpo")]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)

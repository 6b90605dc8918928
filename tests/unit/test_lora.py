"""LoRA: the layer's maths, target selection, errors, the file format, `tunelab merge` and
`tunelab inspect`. The method contract over all architectures is checked in test_method_contract.py,
the comparison with PEFT in test_lora_peft_interop.py."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
from transformers.pytorch_utils import Conv1D

from tunelab import inspection, merging
from tunelab.cli import build_parser
from tunelab.errors import TunelabError
from tunelab.methods import count_parameters, lora, trainable_parameters
from tunelab.methods.lora_layer import LoRALinear, SavedModule


def randomise(model: nn.Module, seed: int = 1) -> None:
    """Random A and B, and a perturbed copy of every saved module."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            for p in (layer.lora_A.weight, layer.lora_B.weight):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
        for saved in lora.saved_modules(model).values():
            for p in saved.trained_module.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))


def load(model_dir, dtype=torch.float32) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


def logits(model: nn.Module) -> torch.Tensor:
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])  # (B, T)
    with torch.no_grad():
        return model(input_ids=ids).logits.float()  # (B, T, V)


# --- the layer -------------------------------------------------------------------------------------


def test_linear_layer_matches_formula():
    """y = W x + b + (alpha / r) B A x, by hand."""
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, r=3, alpha=6)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 4, 6)  # (B, T, in)
    A, B = layer.lora_A.weight, layer.lora_B.weight  # (r, in), (out, r)
    expected = x @ base.weight.T + base.bias + (6 / 3) * (x @ A.T @ B.T)  # (B, T, out)
    torch.testing.assert_close(layer(x), expected)
    assert layer.base_layer is base and not layer.merged


def test_linear_layer_under_autocast_matches_formula_and_its_gradients():
    """Under bf16 autocast the update is one addmm into the base output; output and the gradients
    of x, A and B agree with the formula evaluated in float64 (to bf16's precision)."""
    torch.manual_seed(0)
    base = nn.Linear(64, 48).to(torch.bfloat16)
    layer = LoRALinear(base, r=8, alpha=32)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16, requires_grad=True)  # (B, T, in)
    grad_out = torch.randn(2, 5, 48)  # (B, T, out)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    (y.float() * grad_out).sum().backward()

    W, b = base.weight.double(), base.bias.double()
    A = layer.lora_A.weight.detach().double().requires_grad_()  # (r, in)
    B = layer.lora_B.weight.detach().double().requires_grad_()  # (out, r)
    x64 = x.detach().double().requires_grad_()
    expected = x64 @ W.T + b + (32 / 8) * (x64 @ A.T @ B.T)  # (B, T, out)
    (expected * grad_out.double()).sum().backward()
    peak = expected.abs().max()
    torch.testing.assert_close(y.double() / peak, expected / peak, rtol=0, atol=1e-2)
    for got, want in (
        (x.grad, x64.grad),
        (layer.lora_A.weight.grad, A.grad),
        (layer.lora_B.weight.grad, B.grad),
    ):
        assert got.dtype == (torch.bfloat16 if got is x.grad else torch.float32)
        scale = want.abs().max()
        torch.testing.assert_close(got.double() / scale, want / scale, rtol=0, atol=2e-2)


def test_conv1d_layer_matches_formula_and_merges_transposed():
    """GPT-2's Conv1D stores W as (in, out) and computes x W + b; the delta is merged as (B A)^T."""
    torch.manual_seed(0)
    base = Conv1D(nf=5, nx=6)  # weight (6, 5)
    weight = base.weight.detach().clone()
    layer = LoRALinear(base, r=2, alpha=4)
    assert (layer.in_features, layer.out_features) == (6, 5)
    assert layer.lora_A.weight.shape == (2, 6) and layer.lora_B.weight.shape == (5, 2)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 6)  # (N, in)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    expected = x @ weight + base.bias + 2.0 * (x @ A.T @ B.T)  # (N, out)
    torch.testing.assert_close(layer(x), expected)
    layer.merge()
    torch.testing.assert_close(base.weight, weight + 2.0 * (B @ A).T)
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize(("use_rslora", "scaling"), [(False, 16 / 4), (True, 16 / math.sqrt(4))])
def test_scaling(use_rslora, scaling):
    layer = LoRALinear(nn.Linear(8, 8), r=4, alpha=16, use_rslora=use_rslora)
    assert layer.scaling == pytest.approx(scaling)


def test_init_kaiming_and_gaussian():
    """A: Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)); or N(0, 1/r). B = 0."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(256, 64), r=16, alpha=16)
    assert layer.lora_A.weight.abs().max() <= 1 / math.sqrt(256)
    assert layer.lora_A.weight.std() > 0.5 / math.sqrt(3 * 256)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    gaussian = LoRALinear(nn.Linear(256, 64), r=16, alpha=16, init="gaussian")
    assert gaussian.lora_A.weight.std().item() == pytest.approx(1 / 16, rel=0.1)
    assert torch.count_nonzero(gaussian.lora_B.weight) == 0


def test_dropout_acts_on_the_lora_path_in_training_only():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(32, 32), r=4, alpha=8, dropout=0.5)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 32)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))
    with torch.no_grad():
        base_only = layer.base_layer(x)
    layer.lora_B.weight.data.zero_()
    assert torch.equal(layer(x), base_only)  # the base path has no dropout


def test_half_precision_base_keeps_float32_adapter():
    base = nn.Linear(16, 8).to(torch.bfloat16)
    layer = LoRALinear(base, r=4, alpha=8)
    assert layer.lora_A.weight.dtype == torch.float32 and layer.lora_B.weight.dtype == torch.float32
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    layer.merge()
    assert base.weight.dtype == torch.bfloat16
    torch.testing.assert_close(layer(x), y, atol=0.05, rtol=0.05)


def test_unsupported_layer_type():
    with pytest.raises(TypeError, match="Embedding"):
        LoRALinear(nn.Embedding(10, 4), r=2, alpha=2)


# --- targets ---------------------------------------------------------------------------------------


def test_targets_suffix_regex_and_all_linear(tiny_model_dirs):
    llama = load(tiny_model_dirs["llama"])
    lora.apply(llama, lora.Options(r=2, target_modules=r"model\.layers\.1\.mlp\.(up|down)_proj"))
    assert list(lora.lora_layers(llama)) == ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    param_names = set(trainable_parameters(llama))
    assert "model.layers.1.mlp.up_proj.lora_A.weight" in param_names
    assert "model.layers.1.mlp.up_proj.lora_B.weight" in param_names
    assert "model.layers.1.mlp.up_proj.base_layer.weight" in dict(llama.named_parameters())

    for arch in ("llama", "gpt2", "phi3"):
        model = load(tiny_model_dirs[arch])
        linear = [
            n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and "lm_head" not in n
        ]
        lora.apply(model, lora.Options(target_modules="all-linear"))
        assert list(lora.lora_layers(model)) == linear
        assert not isinstance(model.lm_head, LoRALinear)

    phi3 = load(tiny_model_dirs["phi3"])
    lora.apply(phi3, lora.Options(r=4, target_modules=["qkv_proj", "gate_up_proj"]))
    qkv = phi3.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, LoRALinear) and qkv.lora_B.weight.shape == (qkv.base_layer.out_features, 4)


def test_modules_to_save_trains_a_copy(tiny_model_dirs):
    model = load(tiny_model_dirs["llama"])
    original = model.lm_head.weight.detach().clone()
    lora.apply(model, lora.Options(modules_to_save=["lm_head"]))
    assert isinstance(model.lm_head, SavedModule)
    names = set(trainable_parameters(model))
    assert "lm_head.trained_module.weight" in names and "lm_head.original_module.weight" not in names
    randomise(model)
    assert torch.equal(model.lm_head.original_module.weight, original)
    assert not torch.equal(model.lm_head.weight, original)
    with lora.disabled(model):
        assert torch.equal(model.lm_head.weight, original)


def test_clear_errors(tiny_model_dirs):
    gpt2 = load(tiny_model_dirs["gpt2"])
    with pytest.raises(TunelabError, match=r"match no module.*c_attn, c_fc, c_proj, lm_head"):
        lora.apply(gpt2, lora.Options())  # the default [q_proj, v_proj] does not exist in GPT-2
    with pytest.raises(TunelabError, match=r"cannot wrap.*GPT2MLP.*Linear and Conv1D"):
        lora.apply(gpt2, lora.Options(target_modules=["mlp"]))
    with pytest.raises(TunelabError, match=r"modules_to_save entry 'score' matches no module"):
        lora.apply(gpt2, lora.Options(target_modules=["c_attn"], modules_to_save=["score"]))
    with pytest.raises(TunelabError, match="both a LoRA target and inside modules_to_save"):
        lora.apply(gpt2, lora.Options(target_modules=["c_attn"], modules_to_save=["h.0"]))
    assert not lora.lora_layers(gpt2), "a failed apply leaves the model untouched"
    with pytest.raises(RuntimeError, match="holds no LoRA layers"):  # a programming error
        with lora.disabled(gpt2):
            pass
    lora.apply(gpt2, lora.Options(target_modules=["c_attn"]))
    with pytest.raises(TunelabError, match="already holds LoRA layers"):
        lora.apply(gpt2, lora.Options(target_modules=["c_proj"]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"alpha": 0}, "alpha must be positive"),
        ({"dropout": 1.0}, "dropout"),
        ({"target_modules": []}, "target_modules"),
        ({"target_modules": "q_proj("}, "not a valid regular expression"),
        ({"init": "pissa"}, "init"),
        ({"bias": "all"}, "bias"),
    ],
)
def test_options_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lora.Options(**kwargs)


def test_options_normalise_all_linear():
    assert lora.Options(target_modules="ALL-LINEAR").target_modules == "all-linear"


def test_merge_is_idempotent_and_merge_and_unload_gives_a_plain_model(tiny_model_dirs):
    model = load(tiny_model_dirs["gpt2"])
    lora.apply(model, lora.Options(target_modules="all-linear", modules_to_save=["lm_head"]))
    randomise(model)
    expected = logits(model)
    lora.merge(model)
    merged_once = {n: p.clone() for n, p in model.named_parameters()}
    lora.merge(model)
    assert all(torch.equal(p, merged_once[n]) for n, p in model.named_parameters())
    plain = lora.merge_and_unload(model)
    assert not any(isinstance(m, (LoRALinear, SavedModule)) for m in plain.modules())
    assert not any("lora_" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(logits(plain), expected, atol=1e-5, rtol=1e-4)


# --- files -----------------------------------------------------------------------------------------


def test_adapter_files_use_peft_names(tiny_model_dirs, tmp_path):
    options = lora.Options(r=4, alpha=8, target_modules="all-linear", modules_to_save=["lm_head"])
    model = load(tiny_model_dirs["gpt2"])
    lora.apply(model, options)
    lora.save(model, options, tmp_path, "some/base")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == "some/base"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.0)
    assert config["fan_in_fan_out"] is True and config["bias"] == "none" and config["use_rslora"] is False
    assert config["modules_to_save"] == ["lm_head"]
    # all-linear is recorded as the wrapped module names, as PEFT records it
    assert config["target_modules"] == list(lora.lora_layers(model))
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in keys
    assert "base_model.model.transformer.h.1.mlp.c_proj.lora_B.weight" in keys
    assert "base_model.model.lm_head.weight" in keys
    assert not any(".default" in k or "base_layer" in k for k in keys)
    assert len(keys) == 2 * len(lora.lora_layers(model)) + 1

    import peft

    loaded = peft.LoraConfig.from_pretrained(tmp_path)
    assert loaded.r == 4 and loaded.lora_alpha == 8 and loaded.fan_in_fan_out


def test_load_refuses_what_it_cannot_read(tiny_model_dirs, tmp_path):
    options = lora.Options(r=2)
    model = load(tiny_model_dirs["llama"])
    lora.apply(model, options)
    lora.save(model, options, tmp_path, str(tiny_model_dirs["llama"]))

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "lora_bias": True}))
    with pytest.raises(TunelabError, match="lora_bias=True is not supported"):
        lora.load(load(tiny_model_dirs["llama"]), tmp_path)
    # DoRA loads (test_dora.py), but its files must hold the magnitude vectors.
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(TunelabError, match="adapter_config.json: use_dora is true, but adapter_model"):
        lora.load(load(tiny_model_dirs["llama"]), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(
        TunelabError, match=r"missing \['base_model.model.model.layers.0.self_attn.q_proj.lora_B"
    ):
        lora.load(load(tiny_model_dirs["llama"]), tmp_path)


# --- tunelab merge ---------------------------------------------------------------------------------


def test_merge_command_writes_a_standalone_model(tiny_model_dirs, tiny_tokenizer, tmp_path, capsys):
    base_dir = tiny_model_dirs["llama"]
    options = lora.Options(r=4, alpha=8, target_modules="all-linear", modules_to_save=["lm_head"])
    model = load(base_dir)
    lora.apply(model, options)
    randomise(model)
    expected = logits(model)
    final = tmp_path / "run" / "final"  # what a training run writes
    lora.save(model, options, final, str(base_dir))
    tiny_tokenizer.save_pretrained(final)

    args = build_parser().parse_args(["merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged")])
    assert args.func(args) == 0
    assert "merged model written to" in capsys.readouterr().out
    merged = load(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert (tmp_path / "merged" / "tokenizer_config.json").exists()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    torch.testing.assert_close(logits(merged), expected, atol=1e-5, rtol=1e-4)


def test_merge_keeps_the_base_dtype(tiny_model_dirs, tiny_tokenizer, tmp_path):
    bf16_base = tmp_path / "bf16-base"
    load(tiny_model_dirs["gpt2"], dtype=torch.bfloat16).save_pretrained(bf16_base)
    tiny_tokenizer.save_pretrained(bf16_base)
    options = lora.Options(r=4, target_modules=["c_attn"])
    model = load(bf16_base, dtype=torch.bfloat16)
    lora.apply(model, options)
    randomise(model)
    expected = logits(model)
    lora.save(model, options, tmp_path / "adapter", str(bf16_base))

    merging.merge_adapter(tmp_path / "adapter", tmp_path / "merged")  # tokenizer: the base's
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.dtype == torch.bfloat16
    assert len(AutoTokenizer.from_pretrained(tmp_path / "merged")) == len(tiny_tokenizer)
    weights = load_file(tmp_path / "merged" / "model.safetensors")
    assert weights["transformer.h.0.attn.c_attn.weight"].dtype == torch.bfloat16
    torch.testing.assert_close(logits(merged), expected, atol=0.05, rtol=0.05)
    merging.merge_adapter(tmp_path / "adapter", tmp_path / "merged32", dtype="float32")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged32").dtype == torch.float32


def test_merge_refuses_what_is_not_lora(tiny_model_dirs, tmp_path):
    adapter = tmp_path / "bottleneck"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"tunelab_method": "adapter", "base_model_name_or_path": str(tiny_model_dirs["llama"])})
    )
    with pytest.raises(TunelabError, match="'adapter' adapter cannot be merged.*nonlinearity"):
        merging.merge_adapter(adapter, tmp_path / "out")
    with pytest.raises(TunelabError, match="already holds a full model"):
        merging.merge_adapter(tiny_model_dirs["llama"], tmp_path / "out")


# --- tunelab inspect -------------------------------------------------------------------------------


def llama_7b_config_dir(tmp_path):
    config = LlamaConfig(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=11008,
        vocab_size=32000,
    )
    config.save_pretrained(tmp_path / "llama-2-7b")
    return tmp_path / "llama-2-7b"


def test_inspect_llama_2_7b_on_the_meta_device(tmp_path):
    """r=8 on q_proj, v_proj of Llama-2-7B: 32 layers x 2 modules x 8 x (4096 + 4096) = 4,194,304."""
    config_dir = llama_7b_config_dir(tmp_path)
    start = time.perf_counter()
    text = inspection.inspect_model(str(config_dir), "lora", {"r": 8, "target_modules": ["q_proj", "v_proj"]})
    assert time.perf_counter() - start < 20
    assert "trainable params: 4,194,304 || all params: 6,742,609,920" in text
    assert "model.layers.*.self_attn.q_proj  x32  LoRALinear(Linear(4096 -> 4096), r=8" in text
    assert "model.layers.*.self_attn.v_proj.lora_B.weight  x32  (4096, 8)  = 1,048,576" in text

    import peft

    model = inspection.build_meta_model(str(config_dir))
    peft_model = peft.get_peft_model(
        model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    assert peft_model.get_nb_trainable_parameters() == (4_194_304, 6_742_609_920)


def test_inspect_command_reads_a_yaml_config(tiny_model_dirs, tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text(
        f"model:\n  name_or_path: {tiny_model_dirs['gpt2']}\n"
        "method:\n  name: lora\n  r: 2\n  target_modules: all-linear\n  modules_to_save: [lm_head]\n"
    )
    parser = build_parser()
    args = parser.parse_args(["inspect", str(config)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "transformer.h.*.attn.c_attn  x2  LoRALinear(Conv1D(64 -> 192), r=2" in out
    assert "lm_head  x1  SavedModule" in out
    model = load(tiny_model_dirs["gpt2"])
    lora.apply(model, lora.Options(r=2, target_modules="all-linear", modules_to_save=["lm_head"]))
    trainable, total = count_parameters(model)
    assert f"trainable params: {trainable:,d} || all params: {total:,d}" in out

    config.write_text(f"model:\n  name_or_path: {tiny_model_dirs['gpt2']}\nmethod:\n  name: lora\n  r: 0\n")
    with pytest.raises(TunelabError, match="r must be a positive integer"):
        args = parser.parse_args(["inspect", str(config)])
        args.func(args)

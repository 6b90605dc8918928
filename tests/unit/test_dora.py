"""DoRA (`lora.Options(use_dora=True)`) against the paper's formula and PEFT 0.21's implementation.

- the layer computes m (W + s B A) x / ||W + s B A||_c + b, written out by hand here, for Linear
  and GPT-2's transposed Conv1D, with m starting at ||W||_c (a fresh layer is the identity);
- the norm is a constant in backward: A's gradient equals the hand formula's with n detached;
- whole models: the same (randomised) A, B and m give PEFT's logits; files go both ways
  (`lora_magnitude_vector` keys) with equal logits; merged == unmerged and unmerge restores W;
- `tunelab inspect` counts the magnitude vectors.
"""

from __future__ import annotations

import copy
import functools
import json

import peft
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from tunelab.inspection import inspect_model
from tunelab.methods import lora, trainable_parameters
from tunelab.methods.lora_layer import LoRALinear

MARKERS = (".lora_A.", ".lora_B.", "lora_magnitude_vector")


@functools.cache
def _loaded(model_dir) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def load(model_dir) -> nn.Module:
    return copy.deepcopy(_loaded(model_dir))


def logits(model: nn.Module) -> torch.Tensor:
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11], [9, 8, 7, 6, 5, 4, 3, 2]])  # (B, T)
    with torch.no_grad():
        return model(input_ids=ids).logits  # (B, T, V)


def randomise(model: nn.Module, seed: int = 1) -> int:
    """Perturb A, B and m (B starts at 0 and m at ||W||, which would pass the checks trivially)."""
    gen = torch.Generator().manual_seed(seed)
    touched = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(m in name for m in MARKERS):
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
                touched += 1
    return touched


def dora_reference(weight, bias, a, b, m, s, x):
    """The paper's formula, with W (out, in): m * (W + s B A) x / ||W + s B A||_c + b."""
    adapted = weight + s * b @ a  # (out, in)
    direction = adapted / adapted.norm(dim=1, keepdim=True)  # (out, in), unit rows
    return x @ (m.unsqueeze(1) * direction).T + bias  # (N, out)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_layer_matches_the_formula_and_starts_as_identity(kind):
    torch.manual_seed(0)
    base = nn.Linear(12, 7) if kind == "linear" else Conv1D(7, 12)
    weight = base.weight.detach() if kind == "linear" else base.weight.detach().T  # (out, in)
    bias = base.bias.detach()
    x = torch.randn(5, 12)
    layer = LoRALinear(copy.deepcopy(base), r=3, alpha=6, use_dora=True)
    torch.testing.assert_close(layer.lora_magnitude_vector.detach(), weight.norm(dim=1))
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=1e-6)  # B = 0, m = ||W||
    randomise(nn.ModuleDict({"q": layer}))
    expected = dora_reference(
        weight, bias, layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector, 2.0, x
    )
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_norm_is_a_constant_in_backward():
    torch.manual_seed(0)
    base = nn.Linear(10, 6).requires_grad_(False)
    layer = LoRALinear(base, r=2, alpha=4, use_dora=True)
    randomise(nn.ModuleDict({"q": layer}))
    x = torch.randn(4, 10)
    layer(x).square().sum().backward()

    a = layer.lora_A.weight.detach().clone().requires_grad_(True)
    b = layer.lora_B.weight.detach().clone().requires_grad_(True)
    m = layer.lora_magnitude_vector.detach().clone().requires_grad_(True)
    adapted = base.weight + 2.0 * b @ a  # (out, in)
    norm = adapted.norm(dim=1, keepdim=True).detach()  # (out, 1) constant
    (x @ (m.unsqueeze(1) * adapted / norm).T + base.bias).square().sum().backward()
    torch.testing.assert_close(layer.lora_A.weight.grad, a.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layer.lora_B.weight.grad, b.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layer.lora_magnitude_vector.grad, m.grad, rtol=1e-4, atol=1e-6)


def test_dropout_applies_to_both_lora_terms_in_training_only():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8), r=4, alpha=8, dropout=0.5, use_dora=True)
    randomise(nn.ModuleDict({"q": layer}))
    x = torch.randn(3, 16)
    layer.eval()
    evaluated = layer(x)
    layer.train()
    torch.manual_seed(3)
    trained = layer(x)
    torch.manual_seed(3)
    dropped = layer.lora_dropout(x)
    s, m, n = layer.scaling, layer.lora_magnitude_vector, layer.weight_norm()
    w = layer.base_layer.weight
    expected = (
        layer.base_layer(x)
        + (m / n - 1) * (dropped @ w.T)
        + (m / n) * s * layer.lora_B(layer.lora_A(dropped))
    )
    torch.testing.assert_close(trained, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(trained, evaluated)


@pytest.mark.parametrize(("arch", "targets"), [("llama", "all-linear"), ("gpt2", ["c_attn", "c_proj"])])
def test_forward_equals_peft_with_the_same_weights(tiny_model_dirs, arch, targets):
    base_dir = tiny_model_dirs[arch]
    ours = load(base_dir)
    lora.apply(ours, lora.Options(r=4, alpha=8, target_modules=targets, use_dora=True))
    assert randomise(ours)
    theirs = peft.get_peft_model(
        load(base_dir),
        peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=list(lora.lora_layers(ours)),
            use_dora=True,
            fan_in_fan_out=arch == "gpt2",
        ),
    )
    peft.set_peft_model_state_dict(theirs, {k: v.detach() for k, v in lora.adapter_tensors(ours).items()})
    torch.testing.assert_close(logits(ours), logits(theirs.eval()), rtol=0, atol=1e-5)


def test_tunelab_dora_files_load_in_peft(tiny_model_dirs, tmp_path):
    base_dir = tiny_model_dirs["llama"]
    options = lora.Options(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)
    model = load(base_dir)
    base = logits(model)
    lora.apply(model, options)
    assert randomise(model)
    expected = logits(model)
    assert (expected - base).abs().max() > 1e-3
    lora.save(model, options, tmp_path / "adapter", str(base_dir))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    theirs = peft.PeftModel.from_pretrained(load(base_dir), tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(theirs), expected, rtol=0, atol=1e-5)


def test_peft_dora_files_load_in_tunelab(tiny_model_dirs, tmp_path):
    base_dir = tiny_model_dirs["llama"]
    theirs = peft.get_peft_model(
        load(base_dir),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "up_proj"], use_dora=True),
    )
    assert randomise(theirs) == 3 * 2 * 2  # A, B, m on 2 targets x 2 layers
    expected = logits(theirs.eval())
    theirs.save_pretrained(tmp_path / "adapter")
    ours = load(base_dir)
    lora.load(ours, tmp_path / "adapter")
    assert all(layer.use_dora for layer in lora.lora_layers(ours).values())
    torch.testing.assert_close(logits(ours), expected, rtol=0, atol=1e-5)


def test_merge_equals_unmerged_and_unmerge_restores_the_base(tiny_model_dirs):
    for arch, targets in (("llama", "all-linear"), ("gpt2", "all-linear")):
        model = load(tiny_model_dirs[arch])
        lora.apply(model, lora.Options(r=4, alpha=8, target_modules=targets, use_dora=True))
        randomise(model)
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
        unmerged = logits(model)
        lora.merge(model)
        lora.merge(model)  # idempotent
        torch.testing.assert_close(logits(model), unmerged, rtol=0, atol=1e-5)
        with lora.disabled(model):
            torch.testing.assert_close(logits(model), logits(load(tiny_model_dirs[arch])), rtol=0, atol=1e-5)
        lora.unmerge(model)
        for n, p in model.named_parameters():
            if n in weights:
                torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6)
        plain = lora.merge_and_unload(model)
        assert not lora.lora_layers(plain)
        torch.testing.assert_close(logits(plain), unmerged, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_identity_at_init_round_trip_and_training(tiny_model_dirs, tmp_path, arch):
    """The method contract's checks (test_method_contract.py) for DoRA: exact identity at init,
    exact save/load round trip, and a few steps change exactly A, B and m."""
    base_dir = tiny_model_dirs[arch]
    options = lora.Options(r=4, alpha=8, target_modules="all-linear", use_dora=True)
    model = load(base_dir)
    lora.apply(model, options)
    assert torch.equal(logits(model), logits(load(base_dir)))
    trainable = trainable_parameters(model)
    assert set(trainable) == {n for n, _ in model.named_parameters() if any(m in n for m in MARKERS)}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
    model.train()
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(trainable)
    lora.save(model, options, tmp_path, str(base_dir))
    loaded = load(base_dir)
    lora.load(loaded, tmp_path)
    assert trainable_parameters(loaded) == {}
    assert torch.equal(logits(loaded), logits(model))


def test_only_a_b_and_the_magnitude_train():
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(8, 6))
    lora.apply(model, lora.Options(r=2, alpha=4, target_modules=["q_proj"], use_dora=True))
    assert set(trainable_parameters(model)) == {
        "q_proj.lora_A.weight",
        "q_proj.lora_B.weight",
        "q_proj.lora_magnitude_vector",
    }


def test_inspect_counts_the_magnitude_vectors(tiny_model_dirs):
    base_dir = tiny_model_dirs["llama"]
    config = _loaded(base_dir).config
    hidden, layers = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    r = 4
    plain = inspect_model(str(base_dir), "lora", {"r": r, "target_modules": ["q_proj", "v_proj"]})
    dora = inspect_model(
        str(base_dir), "lora", {"r": r, "target_modules": ["q_proj", "v_proj"], "use_dora": True}
    )
    lora_params = layers * (r * (hidden + hidden) + r * (hidden + kv))
    assert f"trainable params: {lora_params:,d} " in plain
    assert f"trainable params: {lora_params + layers * (hidden + kv):,d} " in dora
    assert "lora_magnitude_vector" in dora and ", dora" in dora

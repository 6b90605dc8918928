"""Bottleneck adapters: the module's maths, the placements against a hand-built forward, options,
parameter counts, layer norms, save/load and error messages."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tunelab.errors import TunelabError
from tunelab.methods import adapter, count_parameters, get_method, trainable_parameters
from tunelab.methods.adapter_module import AdapterLayer, BottleneckAdapter, adapter_parameter_count
from tunelab.trained import load_trained

ACT = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


def load_base(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def input_ids(tokenizer):
    return tokenizer(
        ["the quick brown fox jumps over", "hello world 3 + 7 = 10"], return_tensors="pt", padding=True
    )["input_ids"]


def randomise(params, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params.values():
            p.copy_(p + 0.2 * torch.randn(p.shape, generator=gen))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_module_computes_the_formula_and_starts_at_zero():
    torch.manual_seed(0)
    module = BottleneckAdapter(hidden_size=12, bottleneck=3, activation="tanh")
    h = torch.randn(2, 5, 12)  # (B, T, d)
    assert torch.equal(module(h), torch.zeros_like(h))
    randomise(dict(module.named_parameters()))
    wd, bd, wu, bu = module.down.weight, module.down.bias, module.up.weight, module.up.bias
    expected = torch.tanh(h @ wd.T + bd) @ wu.T + bu  # W_up tanh(W_down h + b_down) + b_up
    torch.testing.assert_close(module(h), expected)
    assert (
        sum(p.numel() for p in module.parameters()) == adapter_parameter_count(12, 3) == 2 * 12 * 3 + 3 + 12
    )


def test_unknown_activation_is_an_error():
    with pytest.raises(TunelabError, match="activation 'swishy'"):
        BottleneckAdapter(8, 2, activation="swishy")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"placement": "everywhere"}, "placement"),
        ({"activation": "swishy"}, "activation"),
        ({"bottleneck": 4, "reduction_factor": 8.0}, "either bottleneck or reduction_factor"),
        ({"bottleneck": 0}, "bottleneck must be >= 1"),
        ({"reduction_factor": 0.0}, "reduction_factor must be > 0"),
        ({"dropout": 1.0}, "dropout"),
        ({"layers": [0], "last_layers": 1}, "either layers or last_layers"),
    ],
)
def test_options_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        adapter.Options(**kwargs)


def test_bottleneck_size():
    assert adapter.bottleneck_size(adapter.Options(), 64) == 4  # default reduction factor 16
    assert adapter.bottleneck_size(adapter.Options(reduction_factor=8.0), 64) == 8
    assert adapter.bottleneck_size(adapter.Options(bottleneck=5), 64) == 5
    assert adapter.bottleneck_size(adapter.Options(reduction_factor=1000.0), 64) == 1


def reference_adapter(weights, prefix, activation):
    """f(h) = W_up act(W_down h + b_down) + b_up, from the saved tensors, without the wrapper."""
    wd, bd = weights[prefix + ".adapter.down.weight"], weights[prefix + ".adapter.down.bias"]
    wu, bu = weights[prefix + ".adapter.up.weight"], weights[prefix + ".adapter.up.bias"]
    return lambda h: F.linear(ACT[activation](F.linear(h, wd, bd)), wu, bu)


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer", "parallel"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_placement_matches_a_hand_built_forward(arch, placement, tiny_model_dirs, tiny_tokenizer):
    """The adapted model equals the plain base model with forward hooks that add the adapter:

    houlsby:  o_proj(a) -> o_proj(a) + s f1(o_proj(a));  mlp(u) -> mlp(u) + s f2(mlp(u))
    pfeiffer: mlp(u) -> mlp(u) + s f(mlp(u))
    parallel: mlp(u) -> mlp(u) + s f(u)
    (GPT-2: attn.c_proj is a transposed Conv1D, left untouched by the wrapper.)"""
    torch.manual_seed(0)
    ids = input_ids(tiny_tokenizer)
    scale, activation = 1.5, "silu"
    model = load_base(tiny_model_dirs[arch])
    adapter.apply(
        model, adapter.Options(placement=placement, bottleneck=6, activation=activation, scale=scale)
    )
    randomise(adapter.method_parameters(model, False))
    weights = {name: p.detach().clone() for name, p in adapter.method_parameters(model, False).items()}
    got = logits(model, ids)

    base = load_base(tiny_model_dirs[arch])
    prefix, attn_name = (
        ("model.layers", "self_attn.o_proj") if arch == "llama" else ("transformer.h", "attn.c_proj")
    )
    hooks = []
    for i, layer in enumerate(base.get_submodule(prefix)):
        targets = [("mlp", False)] if placement != "houlsby" else [(attn_name, False), ("mlp", False)]
        if placement == "parallel":
            targets = [("mlp", True)]
        for path, parallel in targets:
            f = reference_adapter(weights, f"{prefix}.{i}.{path}", activation)

            def hook(module, args, out, f=f, parallel=parallel):
                return out + scale * f(args[0] if parallel else out)

            hooks.append(layer.get_submodule(path).register_forward_hook(hook))
    expected = logits(base, ids)
    for handle in hooks:
        handle.remove()
    assert not torch.allclose(expected, logits(base, ids), atol=1e-4)  # the hooks did something
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize(
    "arch, placement, choice, norm_params",
    [
        ("llama", "houlsby", {"last_layers": 1}, 2 * 64),  # 2 RMSNorms of d
        ("gpt2", "pfeiffer", {"layers": [0]}, 2 * 2 * 64),  # 2 LayerNorms of 2d
        ("phi3", "parallel", {"layers": [-1, 0]}, 2 * 64),
    ],
)
def test_count_matches_formula_with_layer_norms_and_layer_choice(
    arch, placement, choice, norm_params, tiny_model_dirs
):
    model = load_base(tiny_model_dirs[arch])
    adapter.apply(
        model, adapter.Options(placement=placement, reduction_factor=8.0, train_layer_norms=True, **choice)
    )
    num_layers = 1 if "last_layers" in choice or choice["layers"] == [0] else 2
    trainable, _ = count_parameters(model)
    assert trainable == adapter.trainable_parameter_formula(64, 8, placement, num_layers, norm_params)
    assert set(trainable_parameters(model)) == set(adapter.method_parameters(model, True))
    wrapped = [name for name, m in model.named_modules() if isinstance(m, AdapterLayer)]
    assert len(wrapped) == num_layers * (2 if placement == "houlsby" else 1)
    if "last_layers" in choice:
        assert all(".1." in name for name in wrapped)


def test_trained_layer_norms_round_trip_and_disable(llama_dir, tiny_tokenizer, tmp_path):
    ids = input_ids(tiny_tokenizer)
    base_logits = logits(load_base(llama_dir), ids)
    model = load_base(llama_dir)
    options = adapter.Options(placement="houlsby", bottleneck=4, train_layer_norms=True)
    adapter.apply(model, options)
    randomise(adapter.method_parameters(model, True))
    adapted = logits(model, ids)
    with adapter.disabled(model):
        torch.testing.assert_close(logits(model, ids), base_logits, rtol=0, atol=0)
    torch.testing.assert_close(logits(model, ids), adapted, rtol=0, atol=0)

    adapter.save(model, options, tmp_path, str(llama_dir))
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "model.layers.0.input_layernorm.weight" in saved
    assert "model.layers.1.self_attn.o_proj.adapter.up.weight" in saved
    assert not any("base_layer" in name or "q_proj" in name for name in saved)
    reloaded = load_base(llama_dir)
    adapter.load(reloaded, tmp_path, trainable=True)
    torch.testing.assert_close(logits(reloaded, ids), adapted, rtol=0, atol=0)
    assert set(trainable_parameters(reloaded)) == set(saved)
    with adapter.disabled(reloaded):
        torch.testing.assert_close(logits(reloaded, ids), base_logits, rtol=0, atol=0)


def test_disabled_keeps_outside_graphs_valid_and_nests(llama_dir, tiny_tokenizer):
    """A DPO-style step: policy forward with grad, reference forward under `disabled`, backward."""
    ids = input_ids(tiny_tokenizer)
    model = load_base(llama_dir)
    adapter.apply(model, adapter.Options(bottleneck=4, train_layer_norms=True))
    randomise(adapter.method_parameters(model, True))
    loss = model(input_ids=ids, labels=ids).loss
    with adapter.disabled(model), torch.no_grad():
        reference = model(input_ids=ids).logits
        with adapter.disabled(model):  # nested: still disabled
            torch.testing.assert_close(model(input_ids=ids).logits, reference, rtol=0, atol=0)
    loss.backward()
    assert all(p.grad is not None for p in trainable_parameters(model).values())
    assert all(m.enabled for m in model.modules() if isinstance(m, AdapterLayer))


def test_module_options_name_the_targets(llama_dir, tiny_tokenizer):
    """Pfeiffer on `mlp.down_proj` is the same function as on `mlp` (the MLP's output is down_proj's)."""
    ids = input_ids(tiny_tokenizer)
    on_mlp = load_base(llama_dir)
    adapter.apply(on_mlp, adapter.Options(bottleneck=4))
    randomise(adapter.method_parameters(on_mlp, False))
    on_down = load_base(llama_dir)
    adapter.apply(on_down, adapter.Options(bottleneck=4, mlp_module="mlp.down_proj"))
    targets = adapter.method_parameters(on_down, False)
    sources = adapter.method_parameters(on_mlp, False)
    assert set(targets) == {name.replace(".mlp.", ".mlp.down_proj.") for name in sources}
    with torch.no_grad():
        for name, p in sources.items():
            targets[name.replace(".mlp.", ".mlp.down_proj.")].copy_(p)
    torch.testing.assert_close(logits(on_down, ids), logits(on_mlp, ids))


def test_unknown_module_name_error_names_model_and_candidates(llama_dir):
    model = load_base(llama_dir)
    with pytest.raises(TunelabError) as err:
        adapter.apply(model, adapter.Options(placement="houlsby", attn_output_module="attention.dense"))
    message = str(err.value)
    assert "LlamaForCausalLM" in message and "attention.dense" in message and "attn_output_module" in message
    assert "self_attn.o_proj" in message  # lists the layer's modules
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())  # nothing half-applied

    for layer in model.model.layers:  # an architecture whose feed-forward block is not called `mlp`
        layer.ffn = layer.mlp
        del layer.mlp
    with pytest.raises(
        TunelabError, match=r"feed-forward block .*LlamaForCausalLM.*tried \['mlp'\].*mlp_module"
    ):
        adapter.apply(model, adapter.Options())
    adapter.apply(model, adapter.Options(mlp_module="ffn", bottleneck=4))
    assert isinstance(model.model.layers[0].ffn, AdapterLayer)


def test_dropout_acts_in_training_only(llama_dir, tiny_tokenizer):
    ids = input_ids(tiny_tokenizer)
    model = load_base(llama_dir)
    adapter.apply(model, adapter.Options(bottleneck=8, dropout=0.5))
    randomise(adapter.method_parameters(model, False))
    torch.testing.assert_close(logits(model, ids), logits(model, ids), rtol=0, atol=0)
    model.train()
    model.config.attention_dropout = 0.0
    assert not torch.equal(logits(model, ids), logits(model, ids))


def test_apply_twice_is_an_error(llama_dir):
    model = load_base(llama_dir)
    adapter.apply(model, adapter.Options())
    with pytest.raises(TunelabError, match="already has adapters"):
        adapter.apply(model, adapter.Options())


def test_saved_config_and_load_trained(llama_dir, tiny_tokenizer, tmp_path):
    ids = input_ids(tiny_tokenizer)
    model = load_base(llama_dir)
    options = adapter.Options(
        placement="parallel", reduction_factor=8.0, last_layers=1, activation="tanh", scale=4.0
    )
    adapter.apply(model, options)
    randomise(adapter.method_parameters(model, False))
    adapter.save(model, options, tmp_path / "final", str(llama_dir))
    config = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    assert config["tunelab_method"] == "adapter" and config["base_model_name_or_path"] == str(llama_dir)
    assert (config["placement"], config["bottleneck"], config["layers"], config["hidden_size"]) == (
        "parallel",
        8,
        [1],
        64,
    )
    assert (config["activation"], config["scale"], config["adapters_per_layer"]) == ("tanh", 4.0, 1)
    assert get_method("adapter") is adapter

    loaded, tokenizer, method = load_trained(tmp_path, device="cpu")  # the run folder: uses final/
    assert method == "adapter" and len(tokenizer) == len(tiny_tokenizer)
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=0)


def test_load_rejects_weights_that_do_not_fit(llama_dir, tmp_path):
    model = load_base(llama_dir)
    options = adapter.Options(layers=[0], bottleneck=4)
    adapter.apply(model, options)
    adapter.save(model, options, tmp_path, str(llama_dir))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "layers": [0, 1]}))
    with pytest.raises(TunelabError, match=r"missing \['model\.layers\.1\.mlp\.adapter"):
        adapter.load(load_base(llama_dir), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "hidden_size": 32}))
    with pytest.raises(TunelabError, match="hidden size 32"):
        adapter.load(load_base(llama_dir), tmp_path)

"""LoRA through the behaviour suite, on all six tiny architectures, with the default attention targets
and with `all-linear` (+ `lm_head` trained in full).

Adapter weights are randomised (B too) before every check that a zero B would pass trivially.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from transformers import AutoModelForCausalLM

from tunelab.methods import lora, trainable_parameters
from tunelab.tiny import ARCHITECTURES

# GPT-2 and Phi-3 fuse q, k, v into one layer, so `[q_proj, v_proj]` (the default) names nothing there.
ATTENTION_TARGETS = {"gpt2": ["c_attn"], "phi3": ["qkv_proj"]}
CASES = [(arch, targets) for arch in ARCHITECTURES for targets in ("default", "all-linear")]
IDS = [f"{arch}-{targets}" for arch, targets in CASES]


def options_for(arch: str, targets: str) -> lora.Options:
    if targets == "all-linear":
        return lora.Options(r=4, alpha=8, target_modules="all-linear", modules_to_save=["lm_head"])
    if arch in ATTENTION_TARGETS:
        return lora.Options(r=4, alpha=8, target_modules=ATTENTION_TARGETS[arch])
    return lora.Options(r=4, alpha=8)


def randomise(model: torch.nn.Module, seed: int = 1) -> None:
    """Random A and B, and a perturbed copy of every saved module, so the adapter changes outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            for p in (layer.lora_A.weight, layer.lora_B.weight):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
        for saved in lora.saved_modules(model).values():
            for p in saved.trained_module.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))


@functools.cache
def _loaded(model_dir) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def load(model_dir) -> torch.nn.Module:
    """A fresh copy of the model in `model_dir` (loaded from disk once per test session)."""
    return copy.deepcopy(_loaded(model_dir))


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11], [9, 8, 7, 6, 5, 4, 3, 2]])  # (B, T)
    with torch.no_grad():
        return model(input_ids=ids).logits  # (B, T, V)


@pytest.mark.parametrize(("arch", "targets"), CASES, ids=IDS)
def test_identity_at_init(tiny_model_dirs, arch, targets):
    model = load(tiny_model_dirs[arch])
    base = logits(model)
    lora.apply(model, options_for(arch, targets))
    assert lora.lora_layers(model)
    assert torch.equal(logits(model), base)


@pytest.mark.parametrize(("arch", "targets"), CASES, ids=IDS)
def test_merge_unmerge_disable(tiny_model_dirs, arch, targets):
    model = load(tiny_model_dirs[arch])
    base = logits(model)
    base_weights = {n: p.clone() for n, p in model.named_parameters()}
    lora.apply(model, options_for(arch, targets))
    randomise(model)
    unmerged = logits(model)
    assert (unmerged - base).abs().max() > 1e-3, "the randomised adapter must change the outputs"
    with lora.disabled(model):
        assert torch.equal(logits(model), base)

    lora.merge(model)
    lora.merge(model)  # idempotent
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=1e-4)
    with lora.disabled(model):
        torch.testing.assert_close(logits(model), base, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=1e-4)

    lora.unmerge(model)
    for name, layer in lora.lora_layers(model).items():
        for key, p in layer.base_layer.named_parameters():
            torch.testing.assert_close(p, base_weights[f"{name}.{key}"], atol=1e-6, rtol=0)
    with lora.disabled(model):
        torch.testing.assert_close(logits(model), base, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("arch", "targets"), CASES, ids=IDS)
def test_save_load_round_trip(tiny_model_dirs, tmp_path, arch, targets):
    options = options_for(arch, targets)
    model = load(tiny_model_dirs[arch])
    lora.apply(model, options)
    randomise(model)
    expected = logits(model)
    lora.save(model, options, tmp_path / "adapter", str(tiny_model_dirs[arch]))

    fresh = load(tiny_model_dirs[arch])
    lora.load(fresh, tmp_path / "adapter")
    assert list(lora.lora_layers(fresh)) == list(lora.lora_layers(model))
    assert set(trainable_parameters(fresh)) == set(trainable_parameters(model))
    assert torch.equal(logits(fresh), expected)


@pytest.mark.parametrize(("arch", "targets"), CASES, ids=IDS)
def test_training_changes_only_lora_parameters(tiny_model_dirs, arch, targets):
    torch.manual_seed(0)
    model = load(tiny_model_dirs[arch])
    lora.apply(model, options_for(arch, targets))
    model.train()
    trainable = trainable_parameters(model)
    assert all(".lora_A." in n or ".lora_B." in n or ".trained_module." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    # A hand-written AdamW loop on one fixed batch: the loss must fall.
    ids = torch.randint(3, 200, (4, 16))  # (B, T)
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]

    for name, p in model.named_parameters():
        if name in trainable:
            assert not torch.equal(p, before[name]), f"{name} did not train"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"

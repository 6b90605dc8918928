"""Behaviour suite for bottleneck adapters: every tiny architecture x every placement.

Identity at init; with random adapter weights (up-projection included) the output changes, the
save/load round trip is exact and `disabled` gives the base outputs; a few AdamW steps change every
adapter parameter and nothing else, and the loss falls; the trainable count matches the formula.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tunelab.methods import adapter, count_parameters, trainable_parameters
from tunelab.tiny import ARCHITECTURES

PLACEMENTS = ("houlsby", "pfeiffer", "parallel")


def load_base(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def batch(tokenizer):
    enc = tokenizer(
        ["the quick brown fox jumps over a lazy dog", "3 + 7 = 10 yes good"],
        padding=True,
        return_tensors="pt",
    )
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return {**enc, "labels": labels}


def randomise_adapters(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.method_parameters(model, train_layer_norms=False).values():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def logits(model, inputs):
    with torch.no_grad():
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_adapter_behaviour(arch, placement, tiny_model_dirs, tiny_tokenizer, tmp_path):
    torch.manual_seed(0)
    inputs = batch(tiny_tokenizer)
    base = load_base(tiny_model_dirs[arch])
    expected = logits(base, inputs)

    model = load_base(tiny_model_dirs[arch])
    options = adapter.Options(placement=placement, bottleneck=8, activation="gelu", scale=2.0)
    adapter.apply(model, options)
    torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=0)  # identity at init

    num_layers = model.config.num_hidden_layers
    d = model.config.hidden_size
    trainable, _ = count_parameters(model)
    assert trainable == adapter.trainable_parameter_formula(d, 8, placement, num_layers)
    assert set(trainable_parameters(model)) == set(adapter.method_parameters(model, False))

    randomise_adapters(model)
    adapted = logits(model, inputs)
    assert not torch.allclose(adapted, expected, atol=1e-4)
    with adapter.disabled(model):
        torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=0)
    torch.testing.assert_close(logits(model, inputs), adapted, rtol=0, atol=0)

    adapter.save(model, options, tmp_path / "final", str(tiny_model_dirs[arch]))
    reloaded = load_base(tiny_model_dirs[arch])
    adapter.load(reloaded, tmp_path / "final")
    torch.testing.assert_close(logits(reloaded, inputs), adapted, rtol=0, atol=0)
    assert count_parameters(reloaded)[0] == 0  # loaded for inference: frozen

    # A few steps of a hand-written AdamW loop: only adapter parameters move, and all of them do.
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    adapter_names = set(adapter.method_parameters(model, False))
    loss_before = model(**inputs).loss.item()
    optimizer = torch.optim.AdamW(trainable_parameters(model).values(), lr=1e-2, weight_decay=0.01)
    model.train()
    for _ in range(6):
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        loss_after = model(**inputs).loss.item()
    assert loss_after < loss_before
    for name, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[name])
        assert changed == (name in adapter_names), name

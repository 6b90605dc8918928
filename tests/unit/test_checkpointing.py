"""Selective activation checkpointing (`model.checkpoint_every`): only every N-th decoder layer is
checkpointed (recomputed in the backward pass), and the loss and gradients are those of the model
without checkpointing."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import PINNED_MODEL, PINNED_TRAIN
from tunelab.config import load_config
from tunelab.errors import ConfigError
from tunelab.logprobs import model_lm_loss_sum
from tunelab.methods.inject import decoder_layers
from tunelab.training.setup import prepare_model


def loaded(model_dir, *overrides):
    config = load_config(
        None,
        list(overrides),
        model={"name_or_path": str(model_dir), **PINNED_MODEL},
        data={"train": "x.jsonl"},
        train=PINNED_TRAIN,
    )
    model, _, _, _ = prepare_model(config, torch.device("cpu"))
    return model.train()


def loss_gradients_and_calls(model):
    """The summed loss of a fixed batch, every gradient, and how many times each decoder layer ran
    its forward in one forward + backward (2: checkpointed, recomputed in the backward pass)."""
    _, layers = decoder_layers(model)
    calls = [0] * len(layers)
    for i, layer in enumerate(layers):  # the MLP's forward runs inside the layer's checkpointed forward

        def counted(*args, i=i, forward=layer.mlp.forward, **kwargs):
            calls[i] += 1
            return forward(*args, **kwargs)

        layer.mlp.forward = counted
    torch.manual_seed(0)
    ids = torch.randint(3, 200, (2, 12))  # (B, T)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    loss = model_lm_loss_sum(model, batch)
    loss.backward()
    for layer in layers:
        del layer.mlp.forward
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), gradients, calls


@pytest.mark.parametrize(("every", "expected_calls"), [(1, [2, 2]), (2, [2, 1])])
def test_only_every_nth_layer_is_checkpointed_and_the_gradients_are_the_same(
    llama_dir, every, expected_calls
):
    loss, gradients, calls = loss_gradients_and_calls(loaded(llama_dir))
    assert calls == [1, 1]
    checkpointed = loaded(llama_dir, "model.gradient_checkpointing=true", f"model.checkpoint_every={every}")
    _, layers = decoder_layers(checkpointed)
    assert [layer.gradient_checkpointing for layer in layers] == [c == 2 for c in expected_calls]
    loss_c, gradients_c, calls_c = loss_gradients_and_calls(checkpointed)
    assert calls_c == expected_calls
    assert torch.allclose(loss_c, loss, atol=1e-6) and gradients_c.keys() == gradients.keys()
    for name, grad in gradients.items():
        assert torch.allclose(gradients_c[name], grad, atol=1e-6), name


def test_checkpoint_every_must_be_positive():
    with pytest.raises(ConfigError, match="model.checkpoint_every: must be at least 1"):
        load_config(None, ["model.checkpoint_every=0"], model={"name_or_path": "m"})

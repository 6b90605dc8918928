"""`tunelab.training.saved_tensors`: a float32 model under bf16 autocast saves no bf16 copy that
backward can rebuild, and its loss and gradients stay bit for bit those of plain autocast.

Full fine-tuning of tiny models (float32 weights, bf16 autocast, the fused RMSNorm/SwiGLU kernels,
the chunked loss), one forward and backward each way. `stored` tallies what each way keeps between
the passes: a tensor that `LeanSaving.pack` lets through counts, a rebuilt one does not. A frozen
base (bf16 or float32) and float32 full fine-tuning without autocast keep the fused norm's and
SwiGLU's outputs themselves, which are rebuilt too.
"""

from __future__ import annotations

import contextlib
import gc
import weakref

import pytest
import torch
from transformers import AutoModelForCausalLM

from tunelab.kernels import cpu_fused
from tunelab.logprobs import model_lm_loss_sum
from tunelab.training.saved_tensors import LeanSaving, lean_autocast

BF16 = torch.bfloat16


def full_model(folder, fused: bool = True) -> torch.nn.Module:
    """A float32 model with random norm weights (all ones would hide a wrong norm rebuild) and,
    with `fused`, the fused kernels (without them, repeated casts of a norm output are aliased, not
    rebuilt)."""
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.2)
    if fused:
        cpu_fused.apply_fused_kernels(model)
    return model


def batch_for(model) -> dict:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (2, 40), generator=generator)
    labels = ids.clone()
    labels[:, :10] = -100  # a prompt: no loss there
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def loss_and_grads(model, batch, context) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with context:
        loss = model_lm_loss_sum(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch,fused", [("llama", True), ("llama", False), ("qwen2", True), ("phi3", True)])
def test_lean_saving_gives_the_same_loss_and_gradients_bit_for_bit(arch, fused, tiny_model_dirs):
    model = full_model(tiny_model_dirs[arch], fused)
    batch = batch_for(model)
    loss_ref, grads_ref = loss_and_grads(model, batch, torch.autocast("cpu", dtype=BF16))
    loss_lean, grads_lean = loss_and_grads(model, batch, lean_autocast("cpu", BF16))
    assert torch.equal(loss_lean, loss_ref)
    assert grads_lean.keys() == grads_ref.keys()
    for name, grad in grads_ref.items():
        assert torch.equal(grads_lean[name], grad), name


def stored(model, batch, lean: bool, dtype=BF16) -> list[tuple[str, torch.dtype, tuple, torch.Tensor]]:
    """(what made it, dtype, shape, the tensor) of every distinct storage kept for backward, under
    autocast to `dtype` (None: a float32 pass without autocast)."""
    lean_saving = LeanSaving()
    kept, seen = [], set()

    def pack(tensor):
        packed = lean_saving.pack(tensor) if lean else tensor
        if isinstance(packed, torch.Tensor) and packed.untyped_storage().data_ptr() not in seen:
            seen.add(packed.untyped_storage().data_ptr())
            base = packed if packed._base is None else packed._base
            kept.append((type(base.grad_fn).__name__, base.dtype, tuple(base.shape), base))
        return packed

    with torch.autograd.graph.saved_tensors_hooks(pack, LeanSaving.unpack):
        with torch.autocast("cpu", dtype=dtype or BF16, enabled=dtype is not None, cache_enabled=not lean):
            loss = model_lm_loss_sum(model, batch)
    loss.backward()
    return kept


def test_what_is_kept_drops_weight_casts_repeated_casts_and_rebuildable_outputs(llama_dir):
    model = full_model(llama_dir)
    batch = batch_for(model)
    weights = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}
    plain, lean = stored(model, batch, lean=False), stored(model, batch, lean=True)

    def casts_of_weights(kept):
        return [k for k in kept if k[0] == "ToCopyBackward0" and k[1] == BF16 and k[2] in weights]

    def made_by(kept, node):
        return [k for k in kept if k[0] == node]

    layers = model.config.num_hidden_layers
    assert len(casts_of_weights(plain)) >= 7 * layers  # q, k, v, o, gate, up, down
    assert casts_of_weights(lean) == []
    assert len(made_by(plain, "_SwiGLUBackward")) == layers  # down_proj's input
    assert made_by(lean, "_SwiGLUBackward") == []
    plain_casts = [k for k in made_by(plain, "ToCopyBackward0") if k[2] not in weights]
    lean_casts = [k for k in made_by(lean, "ToCopyBackward0") if k[2] not in weights]
    assert len(plain_casts) >= 5 * layers  # the norm outputs, cast by q, k, v and by gate, up
    assert len(lean_casts) < len(plain_casts) - 5 * layers + 1
    plain_bytes = sum(k[3].untyped_storage().nbytes() for k in plain)
    lean_bytes = sum(k[3].untyped_storage().nbytes() for k in lean)
    assert lean_bytes < 0.7 * plain_bytes


def test_a_weight_changed_before_backward_is_an_error(llama_dir):
    """The rebuilt cast would silently use the new weight; autograd's own version check, kept."""
    model = full_model(llama_dir)
    with lean_autocast("cpu", BF16):
        loss = model_lm_loss_sum(model, batch_for(model))
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        loss.backward()


def test_nothing_outlives_the_backward_pass(llama_dir, monkeypatch):
    """The pass's bookkeeping (its `LeanSaving`, which holds graph nodes) is gone once backward ran
    and the loss is dropped, and with it the activations (here a decoder layer's input): a saved
    tensor that held it would keep a step's activations alive into the next."""
    from tunelab.training import saved_tensors

    passes = []

    class Tracked(LeanSaving):
        def __init__(self):
            super().__init__()
            passes.append(weakref.ref(self))

    monkeypatch.setattr(saved_tensors, "LeanSaving", Tracked)
    model = full_model(llama_dir)
    captured = []
    hook = model.model.layers[1].register_forward_pre_hook(
        lambda m, args: captured.append(weakref.ref(args[0]))
    )
    with saved_tensors.lean_autocast("cpu", BF16):
        loss = model_lm_loss_sum(model, batch_for(model))
    loss.backward()
    del loss
    gc.collect()
    hook.remove()
    assert len(passes) == 1 and passes[0]() is None
    assert captured and captured[0]() is None


def frozen_base(folder, dtype: torch.dtype) -> torch.nn.Module:
    """LoRA's case: a frozen base (random norm weights) with the fused kernels, where only q_proj
    and down_proj train, so the input norm's output and SwiGLU's output are kept for their weight
    gradients as they are, not as casts."""
    model = full_model(folder).to(dtype)
    for name, param in model.named_parameters():
        param.requires_grad_("q_proj" in name or "down_proj" in name)
    return model


@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_a_frozen_base_keeps_no_norm_or_swiglu_output(dtype, llama_dir):
    """Without casts (a bf16 base, or float32 without autocast), the fused norm's and SwiGLU's
    outputs are rebuilt too; everything else is kept as before."""
    model = frozen_base(llama_dir, dtype)
    batch = batch_for(model)
    autocast = BF16 if dtype == BF16 else None
    plain, lean = stored(model, batch, False, autocast), stored(model, batch, True, autocast)
    layers = model.config.num_hidden_layers
    rebuilt = ("_RMSNormBackward", "_SwiGLUBackward")
    # q_proj's inputs (the first layer's needs no gradient, has no node, and stays), down_proj's
    assert sum(k[0] == "_RMSNormBackward" for k in plain) == layers - 1
    assert sum(k[0] == "_SwiGLUBackward" for k in plain) == layers
    assert [k[:3] for k in lean] == [k[:3] for k in plain if k[0] not in rebuilt]


@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_a_frozen_base_gives_the_same_loss_and_gradients_bit_for_bit(dtype, llama_dir):
    model = frozen_base(llama_dir, dtype)
    batch = batch_for(model)
    autocast = BF16 if dtype == BF16 else None
    plain = torch.autocast("cpu", dtype=BF16) if autocast else contextlib.nullcontext()
    loss_ref, grads_ref = loss_and_grads(model, batch, plain)
    loss_lean, grads_lean = loss_and_grads(model, batch, lean_autocast("cpu", autocast))
    assert torch.equal(loss_lean, loss_ref)
    assert grads_lean.keys() == grads_ref.keys() and len(grads_ref) == 2 * model.config.num_hidden_layers
    for name, grad in grads_ref.items():
        assert torch.equal(grads_lean[name], grad), name


def test_float32_full_fine_tuning_gives_the_same_loss_and_gradients_bit_for_bit(llama_dir):
    """No autocast: the norm outputs (kept by q, k, v, gate and up for their weight gradients) and
    SwiGLU's are rebuilt; the gradients of every weight stay those of the plain float32 pass."""
    model = full_model(llama_dir)
    batch = batch_for(model)
    loss_ref, grads_ref = loss_and_grads(model, batch, contextlib.nullcontext())
    loss_lean, grads_lean = loss_and_grads(model, batch, lean_autocast("cpu", None))
    assert not torch.is_autocast_enabled("cpu")
    assert torch.equal(loss_lean, loss_ref)
    for name, grad in grads_ref.items():
        assert torch.equal(grads_lean[name], grad), name
    plain, lean = stored(model, batch, False, None), stored(model, batch, True, None)
    assert not [k for k in lean if k[0] in ("_RMSNormBackward", "_SwiGLUBackward")]
    plain_bytes = sum(k[3].untyped_storage().nbytes() for k in plain)
    lean_bytes = sum(k[3].untyped_storage().nbytes() for k in lean)
    assert lean_bytes < 0.9 * plain_bytes


def test_one_context_serves_one_pass_after_another(llama_dir):
    """Evaluation enters the run's context once per batch, as it can with `torch.autocast`."""
    model = full_model(llama_dir)
    batch = batch_for(model)
    context = lean_autocast("cpu", BF16)
    losses = []
    for _ in range(2):
        with context:
            losses.append(model_lm_loss_sum(model, batch))
        assert not torch.is_autocast_enabled("cpu")
    assert torch.equal(losses[0], losses[1])

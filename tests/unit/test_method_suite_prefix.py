"""Prefix tuning through the method behaviour suite, on every architecture the tests build.

The prefix reaches attention through transformers' KV cache, whose handling differs per model;
each test therefore runs on Llama, Qwen2, Mistral (GQA), GPT-2, Gemma and Phi-3.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from tunelab.methods import prefix, trainable_parameters
from tunelab.models import load_model, load_tokenizer
from tunelab.tiny import ARCHITECTURES

M = 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one thread is faster than a thread pool waiting on a shared machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _batch(length: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two sequences; the second is 3 tokens shorter (right padding, pad id 0 masked out)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, 400, (2, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    ids[1, -3:] = 0
    return ids, mask


def _model(model_dir, dtype: str = "float32", seed: int = 0, **options):
    model = load_model(str(model_dir), dtype=dtype, device="cpu")
    torch.manual_seed(seed)
    prefix.apply(model, prefix.Options(**{"num_virtual_tokens": M, **options}))
    return model.eval()


def _no_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def _enable_checkpointing(model) -> None:
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_only_the_prefix_trains(arch, tiny_model_dirs):
    ids, mask = _batch()
    labels = ids.masked_fill(mask == 0, -100)
    model = _model(tiny_model_dirs[arch])
    trainable = trainable_parameters(model)
    assert set(trainable) == {"prefix_encoder.prefix"}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        loss_before = model(input_ids=ids, attention_mask=mask, labels=labels).loss

    optimizer = torch.optim.AdamW(trainable.values(), lr=0.05)
    model.train()
    for _ in range(4):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        assert all(p.grad is None for name, p in model.named_parameters() if name not in trainable)
        assert trainable["prefix_encoder.prefix"].grad.abs().sum() > 0
        optimizer.step()
        optimizer.zero_grad()

    model.eval()
    with torch.no_grad():
        assert model(input_ids=ids, attention_mask=mask, labels=labels).loss < loss_before
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) == (name not in trainable), name


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_save_load_round_trip_is_exact(arch, tiny_model_dirs, tmp_path):
    ids, mask = _batch()
    model = _model(tiny_model_dirs[arch])
    prefix.save(model, prefix.Options(num_virtual_tokens=M), tmp_path, str(tiny_model_dirs[arch]))
    loaded = load_model(str(tiny_model_dirs[arch]), device="cpu").eval()
    prefix.load(loaded, tmp_path)
    assert trainable_parameters(loaded) == {}
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids, attention_mask=mask).logits,
            model(input_ids=ids, attention_mask=mask).logits,
            rtol=0,
            atol=0,
        )


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_disabled_gives_the_base_model(arch, tiny_model_dirs):
    ids, mask = _batch()
    base = load_model(str(tiny_model_dirs[arch]), device="cpu").eval()
    model = _model(tiny_model_dirs[arch])
    with torch.no_grad():
        expected = base(input_ids=ids, attention_mask=mask).logits
        with prefix.disabled(model):
            torch.testing.assert_close(
                model(input_ids=ids, attention_mask=mask).logits, expected, rtol=0, atol=0
            )
        assert not torch.allclose(model(input_ids=ids, attention_mask=mask).logits, expected)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_generation_agrees_with_and_without_cache_and_with_forward(arch, tiny_model_dirs):
    """Greedy decoding of left-padded prompts: same tokens with and without the KV cache, and the
    logits of every step equal one forward over the whole sequence (positions agree)."""
    generator = torch.Generator().manual_seed(1)
    prompts = torch.randint(6, 400, (2, 5), generator=generator)
    mask = torch.ones_like(prompts)
    prompts[0, :2], mask[0, :2] = 0, 0  # left padding
    model = _model(tiny_model_dirs[arch])
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        cached = model.generate(
            input_ids=prompts,
            attention_mask=mask,
            output_logits=True,
            return_dict_in_generate=True,
            **settings,
        )
        uncached = model.generate(input_ids=prompts, attention_mask=mask, use_cache=False, **settings)
        full_mask = torch.cat([mask, torch.ones(2, 4, dtype=mask.dtype)], dim=1)
        full = model(input_ids=cached.sequences, attention_mask=full_mask).logits  # (B, 9, V)
    assert torch.equal(cached.sequences, uncached)
    for step, logits in enumerate(cached.logits):
        torch.testing.assert_close(logits, full[:, 4 + step], rtol=1e-4, atol=1e-4)


def test_sliding_window_generation_agrees_with_forward(tiny_model_dirs):
    """Mistral with a window shorter than prefix + prompt: `generate` keeps a sliding cache layer,
    the forward a full one masked by the window; both must hide the same prefix positions."""
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dirs["mistral"]), sliding_window=3)
    torch.manual_seed(0)
    prefix.apply(model, prefix.Options(num_virtual_tokens=M))
    model.eval()
    prompts = torch.randint(6, 400, (2, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = model.generate(
            input_ids=prompts,
            max_new_tokens=3,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
            output_logits=True,
            return_dict_in_generate=True,
        )
        full = model(input_ids=out.sequences).logits
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, full[:, 5 + step], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_padding_does_not_change_real_tokens(arch, side, tiny_model_dirs):
    generator = torch.Generator().manual_seed(2)
    long, short = (
        torch.randint(6, 400, (7,), generator=generator),
        torch.randint(6, 400, (4,), generator=generator),
    )
    pad = torch.zeros(3, dtype=torch.long)
    padded_short = torch.cat([short, pad]) if side == "right" else torch.cat([pad, short])
    ids = torch.stack([long, padded_short])
    mask = (torch.arange(7) < 4) if side == "right" else (torch.arange(7) >= 3)
    mask = torch.stack([torch.ones(7, dtype=torch.long), mask.long()])
    model = _model(tiny_model_dirs[arch])
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask).logits
        alone_long = model(input_ids=long[None]).logits[0]
        alone_short = model(input_ids=short[None]).logits[0]
    torch.testing.assert_close(batch[0], alone_long, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch[1][mask[1].bool()], alone_short, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_gradient_checkpointing_gives_the_same_loss_and_gradient(arch, tiny_model_dirs):
    ids, mask = _batch()
    labels = ids.masked_fill(mask == 0, -100)
    results = []
    for checkpointing in (False, True):
        model = _model(tiny_model_dirs[arch])
        _no_dropout(model)
        if checkpointing:
            _enable_checkpointing(model)
        model.train()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        results.append((loss.detach(), model.prefix_encoder.prefix.grad.clone()))
    (loss_plain, grad_plain), (loss_ckpt, grad_ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss_plain)
    torch.testing.assert_close(grad_ckpt, grad_plain)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_bfloat16_trains_and_generates(arch, tiny_model_dirs):
    ids, mask = _batch()
    model = _model(tiny_model_dirs[arch], dtype="bfloat16")
    assert model.prefix_encoder.prefix.dtype == torch.float32  # trains in full precision
    model.train()
    loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    loss.backward()
    grad = model.prefix_encoder.prefix.grad
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids[:1], max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None
        )
    assert out.shape == (1, ids.shape[1] + 3)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_init_text_prefix_equals_reading_the_text_first(arch, tiny_model_dirs):
    """With the prefix set to the model's keys/values for text t (m = len(t)) and real tokens at
    positions m, m+1, ..., the prefixed model on x computes what the base model computes on t + x."""
    text = "the quick brown fox"
    text_ids = load_tokenizer(str(tiny_model_dirs[arch]))(text, add_special_tokens=False)["input_ids"]
    model = _model(tiny_model_dirs[arch], num_virtual_tokens=len(text_ids), init_text=text)
    base = load_model(str(tiny_model_dirs[arch]), device="cpu").eval()
    ids, _ = _batch()
    joined = torch.cat([torch.tensor([text_ids] * 2), ids], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids).logits,
            base(input_ids=joined).logits[:, len(text_ids) :],
            rtol=1e-4,
            atol=1e-4,
        )


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_reparameterised_prefix_trains_its_mlp_and_folds_at_save(arch, tiny_model_dirs, tmp_path):
    ids, mask = _batch()
    labels = ids.masked_fill(mask == 0, -100)
    options = prefix.Options(num_virtual_tokens=M, prefix_projection=True, encoder_hidden_size=24)
    model = _model(tiny_model_dirs[arch], prefix_projection=True, encoder_hidden_size=24)
    trainable = trainable_parameters(model)
    assert set(trainable) == {
        "prefix_encoder.embedding",
        "prefix_encoder.transform.0.weight",
        "prefix_encoder.transform.0.bias",
        "prefix_encoder.transform.2.weight",
        "prefix_encoder.transform.2.bias",
    }
    before = {name: p.detach().clone() for name, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=0.01)
    model.train()
    for _ in range(2):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert all(not torch.equal(p, before[name]) for name, p in trainable.items())

    # A checkpoint of the trainable parameters restores the MLP (training resumes) ...
    resumed = _model(tiny_model_dirs[arch], seed=1, prefix_projection=True, encoder_hidden_size=24)
    resumed.load_state_dict({n: p.detach() for n, p in trainable_parameters(model).items()}, strict=False)
    # ... and the saved adapter holds the folded vectors, which give the same logits.
    prefix.save(model, options, tmp_path, str(tiny_model_dirs[arch]))
    folded = load_model(str(tiny_model_dirs[arch]), device="cpu").eval()
    prefix.load(folded, tmp_path)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(
            resumed(input_ids=ids, attention_mask=mask).logits, expected, rtol=0, atol=0
        )
        torch.testing.assert_close(
            folded(input_ids=ids, attention_mask=mask).logits, expected, rtol=1e-6, atol=1e-6
        )

"""Prefix tuning: numerics against a hand-written attention, the cache helpers, options and errors;
and, on every architecture the tests build (the prefix reaches attention through transformers' KV
cache, whose handling differs per model), generation, padding, gradient checkpointing, bfloat16 and
`init_text`. The method contract (training, save/load, `disabled`) is checked in
test_method_contract.py."""

from __future__ import annotations

import copy
import functools
import math
from contextlib import nullcontext

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache, StaticCache
from transformers.models.llama.modeling_llama import LlamaAttention

from tunelab.errors import TunelabError
from tunelab.methods import prefix, trainable_parameters
from tunelab.methods import prefix_cache as kv
from tunelab.models import load_model, load_tokenizer
from tunelab.tiny import ARCHITECTURES

M = 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one thread is faster than a thread pool waiting on a shared machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _ids(batch: int = 2, length: int = 6, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(6, 400, (batch, length), generator=generator)


@functools.cache
def _loaded(model_dir, dtype: str) -> nn.Module:
    return load_model(str(model_dir), dtype=dtype, device="cpu").eval()


def _base(model_dir, dtype: str = "float32") -> nn.Module:
    """A fresh copy of the base model in `model_dir` (read from disk once per session)."""
    return copy.deepcopy(_loaded(model_dir, dtype))


def _prefixed(model_dir, seed: int = 0, dtype: str = "float32", **options):
    model = _base(model_dir, dtype)
    torch.manual_seed(seed)
    prefix.apply(model, prefix.Options(**{"num_virtual_tokens": M, **options}))
    return model.eval()


def _padded_batch(length: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two sequences; the second is 3 tokens shorter (right padding, pad id 0 masked out)."""
    ids = _ids(length=length, seed=seed)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    ids[1, -3:] = 0
    return ids, mask


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def test_llama_logits_equal_attention_computed_by_hand(llama_dir, monkeypatch):
    """Reference, written without caches, masks or the wrapper. For layer l, query position i:

        q_i, k_j = RoPE(W_q h_i, m + i), RoPE(W_k h_j, m + j)       (real tokens at positions m, m+1, ...)
        K = [P_k^l ; k_0 .. k_{T-1}],  V = [P_v^l ; v_0 .. v_{T-1}]   (each KV head repeated H/H_kv times)
        attn_i = softmax(q_i K^T / sqrt(d) over the m prefix keys and keys j <= i) V

    The base model runs with its attention layers replaced by this; the prefix model must agree.
    """
    ids = _ids()
    model = load_model(str(llama_dir), device="cpu", attn_implementation="eager").eval()
    torch.manual_seed(0)
    prefix.apply(model, prefix.Options(num_virtual_tokens=M))
    with torch.no_grad():
        ours = model(input_ids=ids).logits  # (B, T, V)
        ours_masked = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    table = model.prefix_encoder.prefix.detach()  # (m, L, 2, H_kv, d)

    base = load_model(str(llama_dir), device="cpu", attn_implementation="eager").eval()
    batch, length = ids.shape
    config = base.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    positions = torch.arange(M, M + length).unsqueeze(0)  # (1, T)
    cos, sin = base.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)  # (1, T, d)
    allowed = torch.ones(length, M + length, dtype=torch.bool)
    allowed[:, M:] = torch.tril(torch.ones(length, length, dtype=torch.bool))

    def attention_by_hand(self, hidden_states, *args, **kwargs):
        q = self.q_proj(hidden_states).view(batch, length, heads, head_dim).transpose(1, 2)  # (B, H, T, d)
        k = self.k_proj(hidden_states).view(batch, length, kv_heads, head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(batch, length, kv_heads, head_dim).transpose(1, 2)
        q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
        k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
        prefix_k = table[:, self.layer_idx, 0].permute(1, 0, 2).expand(batch, -1, -1, -1)  # (B, H_kv, m, d)
        prefix_v = table[:, self.layer_idx, 1].permute(1, 0, 2).expand(batch, -1, -1, -1)
        keys = torch.cat([prefix_k, k], dim=2).repeat_interleave(heads // kv_heads, dim=1)  # (B, H, m+T, d)
        values = torch.cat([prefix_v, v], dim=2).repeat_interleave(heads // kv_heads, dim=1)
        scores = q @ keys.transpose(-1, -2) / math.sqrt(head_dim)  # (B, H, T, m+T)
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        out = (weights @ values).transpose(1, 2).reshape(batch, length, heads * head_dim)
        return self.o_proj(out), weights

    monkeypatch.setattr(LlamaAttention, "forward", attention_by_hand)
    with torch.no_grad():
        reference = base(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_masked, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grow", [False, True])
def test_gradients_flow_through_the_cache(grow):
    """`[prefix ; new]` from `update` keeps the graph to the prefix (DynamicCache does not detach)."""
    prefix_k = torch.randn(2, 2, 3, 4, requires_grad=True)  # (B, H, m, d)
    prefix_v = torch.randn(2, 2, 3, 4, requires_grad=True)
    cache = kv.new_prefix_cache([(prefix_k, prefix_v)], grow=grow)
    keys, values = cache.update(torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4), 0)
    assert keys.shape == (2, 2, 8, 4)
    (keys.sum() + 2 * values.sum()).backward()
    torch.testing.assert_close(prefix_k.grad, torch.ones_like(prefix_k))
    torch.testing.assert_close(prefix_v.grad, torch.full_like(prefix_v, 2.0))
    assert kv.cache_length(cache) == (8 if grow else 3)
    assert kv.prefix_tokens_in(cache) == 3


def test_saved_layout_is_pefts():
    """`prompt_embeddings` viewed as PEFT's get_prompt does, (m, L*2, H, d), gives layer l's keys at
    index 2l and values at 2l+1."""
    encoder = prefix.PrefixEncoder(num_virtual_tokens=3, num_layers=2, num_kv_heads=2, head_dim=4)
    flat = encoder.folded()  # (m, L*2*H*d)
    assert flat.shape == (3, 2 * 2 * 2 * 4)
    peft_view = flat.view(3, 2 * 2, 2, 4)  # (m, L*2, H, d)
    table = encoder.prefix.detach()
    for layer in range(2):
        torch.testing.assert_close(peft_view[:, 2 * layer], table[:, layer, 0])
        torch.testing.assert_close(peft_view[:, 2 * layer + 1], table[:, layer, 1])


def test_options_are_checked():
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        prefix.Options(num_virtual_tokens=0)
    with pytest.raises(ValueError, match="prefix_projection"):
        prefix.Options(encoder_hidden_size=16)
    with pytest.raises(ValueError, match="encoder_hidden_size"):
        prefix.Options(prefix_projection=True, encoder_hidden_size=0)
    with pytest.raises(ValueError, match="init_text"):
        prefix.Options(init_text="  ")
    with pytest.raises(ValueError, match="prefix_projection"):
        prefix.Options(init_text="hello", prefix_projection=True)


def test_apply_freezes_the_model_and_adds_only_the_prefix(llama_dir):
    model = _prefixed(llama_dir)
    assert set(trainable_parameters(model)) == {"prefix_encoder.prefix"}
    config = model.config
    kv_dim = config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    assert model.prefix_encoder.prefix.numel() == M * config.num_hidden_layers * 2 * kv_dim
    assert model.prefix_encoder.prefix.dtype == torch.float32
    with pytest.raises(TunelabError, match="already has a prefix"):
        prefix.apply(model, prefix.Options())


def test_remove_restores_the_base_model(llama_dir):
    ids = _ids()
    base = _base(llama_dir)
    model = _prefixed(llama_dir)
    prefix.remove(model)
    assert not hasattr(model, "prefix_encoder") and "forward" not in model.__dict__
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits)


def test_continuing_from_a_returned_cache_equals_one_forward(llama_dir):
    """Eval forward with use_cache, then the next tokens with that cache (with and without a mask):
    the cache holds the prefix and the first tokens, positions carry on."""
    ids = _ids(length=8)
    model = _prefixed(llama_dir)
    with torch.no_grad():
        full = model(input_ids=ids).logits
        first = model(input_ids=ids[:, :5], use_cache=True)
        assert kv.cache_length(first.past_key_values) == M + 5
        second = model(input_ids=ids[:, 5:], past_key_values=first.past_key_values)
        torch.testing.assert_close(
            torch.cat([first.logits, second.logits], dim=1), full, rtol=1e-5, atol=1e-5
        )
        cache = DynamicCache()
        model(input_ids=ids[:, :5], attention_mask=torch.ones(2, 5, dtype=torch.long), past_key_values=cache)
        masked = model(input_ids=ids[:, 5:], attention_mask=torch.ones_like(ids), past_key_values=cache)
        torch.testing.assert_close(masked.logits, full[:, 5:], rtol=1e-5, atol=1e-5)


def test_training_forward_returns_no_cache(llama_dir):
    model = _prefixed(llama_dir).train()
    assert model(input_ids=_ids()).past_key_values is None
    assert model(input_ids=_ids(), return_dict=False)[1] is None


def test_deepcopy_gives_an_independent_prefixed_model(llama_dir):
    ids = _ids()
    model = _prefixed(llama_dir)
    twin = copy.deepcopy(model)
    assert twin.forward.__self__ is twin
    with torch.no_grad():
        twin.prefix_encoder.prefix.add_(1.0)
        assert not torch.allclose(twin(input_ids=ids).logits, model(input_ids=ids).logits)


def test_bad_inputs_raise_clear_errors(llama_dir):
    ids = _ids()
    model = _prefixed(llama_dir)
    with torch.no_grad():
        with pytest.raises(TunelabError, match="2-D attention_mask"):
            model(input_ids=ids, attention_mask=torch.ones(2, 1, 6, 6))
        with pytest.raises(TunelabError, match="columns"):
            model(input_ids=ids, attention_mask=torch.ones(2, 4, dtype=torch.long))
        foreign = DynamicCache()
        foreign.update(torch.zeros(2, 2, 1, 16), torch.zeros(2, 2, 1, 16), 0)
        with pytest.raises(TunelabError, match="not this model's prefix"):
            model(input_ids=ids, past_key_values=foreign)
        packed = torch.tensor([[0, 1, 2, 0, 1, 2]] * 2)
        with pytest.raises(TunelabError, match="packed"):
            model(input_ids=ids, position_ids=packed)
        static = StaticCache(config=model.config, max_cache_len=32)
        with pytest.raises(TunelabError, match="StaticCache"):
            model(input_ids=ids, past_key_values=static)


def test_a_dropped_cache_is_detected(llama_dir, monkeypatch):
    """Were transformers to drop past_key_values under gradient checkpointing again, the forward
    must fail loudly (attention shapes disagree with the mask, or our check of the layers the prefix
    reached fires) rather than train without the prefix."""
    model = _prefixed(llama_dir).train()
    model.gradient_checkpointing_enable()
    monkeypatch.setattr(kv, "cache_kept_under_checkpointing", lambda model: nullcontext())
    with pytest.raises((TunelabError, RuntimeError), match="did not reach layers|must match the size"):
        model(input_ids=_ids(), labels=_ids())


def test_init_text_reads_the_models_keys_and_values(llama_dir):
    """init_text 'a b' (cycled to m tokens) gives the keys/values the model caches for those tokens."""
    model = _prefixed(llama_dir, init_text="hello world")
    base = _base(llama_dir)
    ids = load_tokenizer(str(llama_dir))("hello world", add_special_tokens=False)["input_ids"]
    ids = (ids * M)[:M]
    with torch.no_grad():
        cache = base(input_ids=torch.tensor([ids]), use_cache=True).past_key_values
    for layer, (keys, values) in enumerate(kv.layer_key_values(cache)):
        torch.testing.assert_close(model.prefix_encoder.prefix[:, layer, 0], keys[0].transpose(0, 1))
        torch.testing.assert_close(model.prefix_encoder.prefix[:, layer, 1], values[0].transpose(0, 1))


def test_load_trained_reads_a_saved_prefix(llama_dir, tmp_path):
    """The project's entry point for eval/generate finds the method from adapter_config.json."""
    from tunelab.methods import get_method
    from tunelab.trained import load_trained

    assert get_method("prefix") is prefix
    ids = _ids()
    model = _prefixed(llama_dir)
    prefix.save(model, prefix.Options(num_virtual_tokens=M), tmp_path, str(llama_dir))
    loaded, tokenizer, method = load_trained(tmp_path, device="cpu")
    assert method == "prefix" and tokenizer is not None
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


# --- on every architecture -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_generation_agrees_with_and_without_cache_and_with_forward(arch, tiny_model_dirs):
    """Greedy decoding of left-padded prompts: same tokens with and without the KV cache, and the
    logits of every step equal one forward over the whole sequence (positions agree)."""
    generator = torch.Generator().manual_seed(1)
    prompts = torch.randint(6, 400, (2, 5), generator=generator)
    mask = torch.ones_like(prompts)
    prompts[0, :2], mask[0, :2] = 0, 0  # left padding
    model = _prefixed(tiny_model_dirs[arch])
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
    model = _prefixed(tiny_model_dirs[arch])
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask).logits
        alone_long = model(input_ids=long[None]).logits[0]
        alone_short = model(input_ids=short[None]).logits[0]
    torch.testing.assert_close(batch[0], alone_long, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch[1][mask[1].bool()], alone_short, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_gradient_checkpointing_gives_the_same_loss_and_gradient(arch, tiny_model_dirs):
    ids, mask = _padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    results = []
    for checkpointing in (False, True):
        model = _prefixed(tiny_model_dirs[arch])
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        if checkpointing:
            enable = (
                getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            )
            enable()
        model.train()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        results.append((loss.detach(), model.prefix_encoder.prefix.grad.clone()))
    (loss_plain, grad_plain), (loss_ckpt, grad_ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss_plain)
    torch.testing.assert_close(grad_ckpt, grad_plain)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_bfloat16_trains_and_generates(arch, tiny_model_dirs):
    ids, mask = _padded_batch()
    model = _prefixed(tiny_model_dirs[arch], dtype="bfloat16")
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
    model = _prefixed(tiny_model_dirs[arch], num_virtual_tokens=len(text_ids), init_text=text)
    base = _base(tiny_model_dirs[arch])
    ids, _ = _padded_batch()
    joined = torch.cat([torch.tensor([text_ids] * 2), ids], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids).logits,
            base(input_ids=joined).logits[:, len(text_ids) :],
            rtol=1e-4,
            atol=1e-4,
        )

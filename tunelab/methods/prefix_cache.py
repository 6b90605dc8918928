"""Everything prefix tuning needs from transformers' KV-cache classes, kept in this one file.

Prefix tuning enters attention as *past* keys and values: layer l attends over
`[P_k^l ; K^l]` and `[P_v^l ; V^l]`, which is exactly what a KV cache that already holds m
positions gives. PEFT's prefix tuning has broken with several cache refactors of transformers;
here everything it depends on sits in one place, and `tests/unit/test_prefix.py` (with
`tests/unit/test_method_contract.py`) checks it on every architecture the tests build.

What we rely on (transformers 5.x):

0. the cache argument of a model's forward, and the output field holding it, is `cache` from
   transformers 5.24 on and `past_key_values` before (`cache_argument` reads which from the
   forward's signature; a caller's `past_key_values` is moved to `cache` where needed);
1. every attention layer calls `cache.update(k, v, layer_idx)` and attends over the
   keys/values it returns (so a cache that returns `[prefix ; new]` injects the prefix);
2. the causal mask takes its query offset from `get_seq_length()` and its key length from
   `get_mask_sizes(q_len, layer_idx)`, so the prefix sits at cache indices 0..m-1 and every query
   sees it (the caller adds m ones to a 2-D `attention_mask`);
3. `DynamicLayer.update` concatenates with `torch.cat` and never detaches: gradients flow from
   the attention output back into the prefix tensors (a unit test checks this);
4. `generate` (`_prepare_cache_for_generation`) makes an empty `DynamicCache(config=...)` (with
   sliding-window layers where the config has them) before its first forward and passes that
   object, or the one the forward returned, to every later forward. It numbers positions from
   the 2-D attention mask (cumsum - 1, from 0) and drops an all-ones mask; `cache_position` is
   gone from 5.x model code (generate only makes it for remote-code models);
5. under gradient checkpointing, `GradientCheckpointingLayer` drops the cache from its
   keyword arguments unless the layer's `_can_checkpoint_with_cache` is true, and GPT-2's model
   passes `None` to its blocks while its own `gradient_checkpointing` flag is set.

Two caches come out of here. `PrefixOnlyCache` holds the prefix and never grows: `update` returns
`[prefix ; new]` without storing `new`, so the recomputation of a checkpointed layer in the
backward pass sees the same keys again (a growing cache would append the layer's keys twice).
It serves every forward whose cache nobody reads afterwards (training). A plain `DynamicCache`
filled with the prefix serves generation and any forward whose cache is kept.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from tunelab.errors import TunelabError

# Attribute set on a cache that holds our prefix in its first m positions (value: m).
PREFIX_MARK = "_tunelab_prefix_tokens"

LayerKV = tuple[torch.Tensor, torch.Tensor]  # keys, values: each (B, H_kv, S, d)


class PrefixOnlyCache(DynamicCache):
    """A cache holding only the prefix; `update` returns `[prefix ; new]` and stores nothing.

    Its length stays m for the whole forward, so the mask and the query offset are the same in
    every layer, and calling `update` twice for a layer (checkpoint recomputation) is harmless.
    `layers_reached` records which layers asked for their keys, to catch a model that silently
    dropped the cache.
    """

    def __init__(self, prefix: Sequence[LayerKV]):
        super().__init__()
        for layer_idx, (keys, values) in enumerate(prefix):
            Cache.update(self, keys, values, layer_idx)
        self.layers_reached: set[int] = set()
        setattr(self, PREFIX_MARK, prefix[0][0].shape[-2])

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Return the prefix followed by this forward's keys/values, without storing them."""
        self.layers_reached.add(layer_idx)
        layer = self.layers[layer_idx]
        keys = torch.cat([layer.keys.to(key_states.dtype), key_states], dim=-2)  # (B, H, m + T, d)
        values = torch.cat([layer.values.to(value_states.dtype), value_states], dim=-2)  # (B, H, m + T, d)
        return keys, values


LEGACY_CACHE_ARGUMENT = "past_key_values"


def cache_argument(forward_signature: inspect.Signature) -> str:
    """The name of the cache argument of a model forward with this signature: `cache`
    (transformers >= 5.24) or `past_key_values` (earlier)."""
    return "cache" if "cache" in forward_signature.parameters else LEGACY_CACHE_ARGUMENT


def output_cache(outputs: object) -> object:
    """The cache a model forward returned (None when it returned none), under either name."""
    if isinstance(outputs, ModelOutput):
        for name in ("cache", LEGACY_CACHE_ARGUMENT):
            if name in outputs.__dataclass_fields__:
                return outputs.get(name)
        return None
    cache = getattr(outputs, "cache", None)  # not `or`: an empty Cache has length 0, so is falsy
    return cache if cache is not None else getattr(outputs, LEGACY_CACHE_ARGUMENT, None)


def drop_output_cache(outputs: object, cache: object) -> object:
    """`outputs` with `cache` replaced by None wherever it appears (a tuple or a `ModelOutput`)."""
    if isinstance(outputs, tuple):
        return tuple(None if item is cache else item for item in outputs)
    if isinstance(outputs, ModelOutput):
        for name in ("cache", LEGACY_CACHE_ARGUMENT):
            if name in outputs.__dataclass_fields__ and outputs.get(name) is cache:
                outputs[name] = None
    return outputs


def is_prefix_only(cache: object) -> bool:
    """Is `cache` a `PrefixOnlyCache` (holds the prefix, never this forward's tokens)?"""
    return isinstance(cache, PrefixOnlyCache)


def is_cache(obj: object) -> bool:
    """Is `obj` a transformers `Cache`?"""
    return isinstance(obj, Cache)


def cache_length(cache: Cache) -> int:
    """Positions held by the cache (prefix included when it holds one)."""
    return int(cache.get_seq_length())


def prefix_tokens_in(cache: Cache) -> int | None:
    """m when the cache holds our prefix, else None."""
    return getattr(cache, PREFIX_MARK, None)


def new_prefix_cache(prefix: Sequence[LayerKV], grow: bool) -> Cache:
    """A cache holding `prefix` (one (keys, values) pair per layer, each (B, H_kv, m, d)).

    `grow=True` gives a `DynamicCache` that appends this forward's keys (for later reuse);
    `grow=False` a `PrefixOnlyCache` (training: safe under gradient checkpointing).
    """
    if not grow:
        return PrefixOnlyCache(prefix)
    cache = DynamicCache()
    fill_cache(cache, prefix)
    return cache


def fill_cache(cache: Cache, prefix: Sequence[LayerKV]) -> None:
    """Write `prefix` into the empty `cache` (the one `generate` creates) and mark it."""
    if not is_cache(cache):
        raise TunelabError(
            f"prefix tuning needs the cache to be a transformers Cache, got {type(cache).__name__}"
        )
    if cache.is_compileable:
        raise TunelabError(
            f"prefix tuning does not support {type(cache).__name__} (a fixed-size cache would overflow by the "
            "prefix length); generate with the default dynamic cache"
        )
    if cache_length(cache) != 0:
        raise RuntimeError("fill_cache called on a cache that already holds positions")  # a bug of ours
    for layer_idx, (keys, values) in enumerate(prefix):
        cache.update(keys, values, layer_idx)
    setattr(cache, PREFIX_MARK, prefix[0][0].shape[-2])


def layers_missed(cache: Cache, num_layers: int) -> list[int]:
    """Layers of a `PrefixOnlyCache` that never read the prefix during the last forward."""
    if not is_prefix_only(cache):
        return []
    return [i for i in range(num_layers) if i not in cache.layers_reached]


def layer_key_values(cache: Cache) -> list[LayerKV]:
    """The (keys, values) each layer of a filled cache holds, each (B, H_kv, S, d)."""
    pairs = []
    for layer in cache.layers:
        if getattr(layer, "keys", None) is None:
            raise TunelabError(f"cache layer {type(layer).__name__} holds no keys/values")
        pairs.append((layer.keys, layer.values))
    return pairs


@torch.no_grad()
def model_key_values(model: nn.Module, input_ids: torch.Tensor) -> list[LayerKV]:
    """Run `model` on `input_ids` (1, n) and return each layer's keys/values, each (1, H_kv, n, d).

    Keys are as attention stores them (after the rotary embedding, for positions 0..n-1), which is
    the form a prefix has. Used to read the KV shapes of a model and for `init_text`. The cache is
    a plain `DynamicCache`, every layer full: a sliding-window layer would keep only the last
    `sliding_window` of the n tokens.
    """
    was_training = model.training
    model.eval()
    argument = cache_argument(inspect.signature(type(model).forward))
    try:
        outputs = model(input_ids=input_ids, use_cache=True, **{argument: DynamicCache()})
    finally:
        model.train(was_training)
    cache = output_cache(outputs)
    if not is_cache(cache):
        raise TunelabError(
            f"{type(model).__name__} returned no KV cache for use_cache=True; prefix tuning needs one"
        )
    return [(k.detach(), v.detach()) for k, v in layer_key_values(cache)]


def checkpointing_active(model: nn.Module) -> bool:
    """Does gradient checkpointing apply to `model`'s next forward (training mode, flag set)?"""
    return model.training and any(
        isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing for m in model.modules()
    )


@contextmanager
def cache_kept_under_checkpointing(model: nn.Module) -> Iterator[None]:
    """While active, checkpointed decoder layers keep receiving the cache (see point 5).

    Only valid with a `PrefixOnlyCache`, whose `update` may be called again on recomputation.
    Layers get `_can_checkpoint_with_cache = True`; a model-level `gradient_checkpointing` flag
    (GPT-2's, which passes `None` to its blocks when set) is cleared, while the blocks' own flags,
    which do the checkpointing, stay on.
    """
    saved: list[tuple[nn.Module, str, object]] = []
    try:
        for module in model.modules():
            if not getattr(module, "gradient_checkpointing", False):
                continue
            if isinstance(module, GradientCheckpointingLayer):
                saved.append(
                    (module, "_can_checkpoint_with_cache", module.__dict__.get("_can_checkpoint_with_cache"))
                )
                module._can_checkpoint_with_cache = True
            else:
                saved.append((module, "gradient_checkpointing", True))
                module.gradient_checkpointing = False
        yield
    finally:
        for module, name, value in saved:
            if value is None and name == "_can_checkpoint_with_cache":
                del module._can_checkpoint_with_cache
            else:
                setattr(module, name, value)

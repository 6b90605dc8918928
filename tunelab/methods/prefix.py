"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation").

Every attention layer l gets m trainable key vectors P_k^l and value vectors P_v^l, shaped like
the layer's keys (H_kv heads x head size d, so grouped-query models get H_kv, not H, heads).
A query at position i of the input attends over the prefix and the causal past:

    attn_i = softmax( q_i [P_k^l ; K^l_{<=i}]^T / sqrt(d) ) [P_v^l ; V^l_{<=i}]

Only the prefixes train; the model is frozen. The prefix is not an identity at init (any key
changes the softmax normaliser), unlike LoRA; the paper and PEFT accept this.

Parameters. One tensor `prefix` of shape (m, L, 2, H_kv, d), initialised from the model's own
keys/values for the first m tokens of `init_text` (the paper's "real word" initialisation, the
default: the prefixed model then computes exactly what the base model computes after reading that
text), or with `init_text: null` N(0, 1) as PEFT's `nn.Embedding`. With `prefix_projection` the
prefix is instead the output of PEFT's reparameterisation (paper section 4.3): an embedding E
(m, H_kv*d) and an MLP Linear(H_kv*d, e) -> tanh -> Linear(e, L*2*H_kv*d), e =
`encoder_hidden_size`. The MLP trains (its weights are parameters of the model, so checkpoints keep
it and training resumes); `save` folds it into plain vectors.

Forward. `apply` registers the parameters as `model.prefix_encoder` and replaces `model.forward`
by a wrapper that, when the caller gives no cache, builds one holding the prefix (see
`prefix_cache.py`, the only file that knows transformers' cache classes), prepends m ones to a
2-D `attention_mask`, and shifts the position ids. `generate` works unchanged: its first forward
gets an empty cache, which the wrapper fills, so the cache holds the prefix first and then the
prompt and generated tokens.

Position ids: real tokens start at position m, the prefix taking positions 0..m-1 (it is
stored as already-rotated keys, so nothing is computed at those positions). PEFT 0.21 does the
same: transformers counts the m cached positions when no position ids are given, and PEFT adds m
to position ids that are given (as `generate` gives them, counting from 0). Here too, position
ids from the caller or from `generate` count real tokens from 0 and are shifted by m; without
them they come from the attention mask (cumsum - 1, so left padding does not move real tokens;
PEFT's forward numbers every row m, m+1, ... regardless), or are m, m+1, ... when there is no mask.
Training, evaluation and generation therefore agree.

Gradient checkpointing works with `use_reentrant=False` (transformers' default); see
`prefix_cache.cache_kept_under_checkpointing`. The reentrant variant works only without
`prefix_projection` (it back-propagates through the MLP once per layer, which autograd refuses).

Saved artifact: PEFT's PREFIX_TUNING format: `adapter_config.json` and one tensor
`prompt_embeddings` of shape (m, L*2*H_kv*d), laid out [layer][key|value][head][dim] as PEFT's
`get_prompt` reshapes it (m, L*2, H_kv, d); PEFT sets `token_dim = H_kv*d` and
`num_attention_heads = H_kv` for grouped-query models.

With the prefix switched off the model is the base model (`DISABLES_TO_BASE`, `disabled`).
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from tunelab.errors import TunelabError
from tunelab.methods import freeze_all
from tunelab.methods import prefix_cache as kv
from tunelab.methods.adapter_files import (
    WEIGHTS_FILE,
    config_field,
    options_from_config,
    read_adapter_config,
    read_adapter_weights,
    write_adapter_folder,
)
from tunelab.weights import load_into

ENCODER_NAME = "prefix_encoder"
SAVED_NAME = "prompt_embeddings"  # PEFT's name for the folded prefix, (m, L*2*H_kv*d)
SHAPE_FIELDS = ("num_layers", "num_attention_heads", "token_dim")  # adapter_config.json: (L, H_kv, H_kv*d)
DISABLES_TO_BASE = True


DEFAULT_INIT_TEXT = "Read the request below and give a helpful, accurate answer."
"""The text whose keys/values start a prefix unless `init_text` names another (or null)."""


@dataclass
class Options:
    num_virtual_tokens: int = 20
    """m, the number of prefix positions prepended to the keys and values of every attention layer."""
    prefix_projection: bool = False
    """Reparameterise the prefix as an MLP over an (m, H_kv*d) embedding (paper section 4.3, PEFT's
    `prefix_projection`); the MLP trains and is folded into plain vectors by `save`."""
    encoder_hidden_size: int | None = None
    """Hidden width e of the reparameterisation MLP (default H_kv*d, as PEFT). Needs `prefix_projection`."""
    init_text: str | None = DEFAULT_INIT_TEXT
    """Initialise the prefix with the model's own keys/values for the first m tokens of this text
    (repeated when shorter; no special tokens added): the paper's "real word" initialisation, the
    default because a random prefix starts a pretrained model far from itself (SmolLM2-135M: first
    loss 13.7 against 3.1, held-out loss 3.63 against 0.55 after 40 steps; BENCHMARKS.md). `null`:
    random N(0, 1), as PEFT. With `prefix_projection` the default is `null` (its MLP starts random,
    as in PEFT); another text cannot be combined with it."""

    def __post_init__(self):
        if self.num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be at least 1, got {self.num_virtual_tokens}")
        if self.encoder_hidden_size is not None:
            if not self.prefix_projection:
                raise ValueError(
                    "encoder_hidden_size is the width of the prefix MLP: set prefix_projection: true"
                )
            if self.encoder_hidden_size < 1:
                raise ValueError(f"encoder_hidden_size must be at least 1, got {self.encoder_hidden_size}")
        if self.prefix_projection and self.init_text == DEFAULT_INIT_TEXT:
            self.init_text = None
        if self.init_text is not None and not self.init_text.strip():
            raise ValueError("init_text is empty; set it to null for a random prefix")
        if self.init_text is not None and self.prefix_projection:
            raise ValueError(
                "init_text sets plain prefix vectors; it cannot be combined with prefix_projection"
            )


class PrefixEncoder(nn.Module):
    """The trainable prefix of every layer; `forward()` gives it as (m, L, 2, H_kv, d) in float32."""

    def __init__(
        self,
        num_virtual_tokens: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        encoder_hidden_size: int | None = None,
    ):
        super().__init__()
        self.shape = (num_virtual_tokens, num_layers, 2, num_kv_heads, head_dim)  # (m, L, 2, H, d)
        self.token_dim = num_kv_heads * head_dim
        self.projection = encoder_hidden_size is not None
        self.enabled = True
        if self.projection:
            self.embedding = nn.Parameter(torch.randn(num_virtual_tokens, self.token_dim))  # (m, H*d)
            self.transform = nn.Sequential(
                nn.Linear(self.token_dim, encoder_hidden_size),
                nn.Tanh(),
                nn.Linear(encoder_hidden_size, num_layers * 2 * self.token_dim),
            )
        else:
            self.prefix = nn.Parameter(torch.randn(self.shape))  # (m, L, 2, H, d)

    @property
    def num_virtual_tokens(self) -> int:
        return self.shape[0]

    @property
    def num_layers(self) -> int:
        return self.shape[1]

    def forward(self) -> torch.Tensor:
        """The prefix, (m, L, 2, H, d)."""
        if self.projection:
            return self.transform(self.embedding).view(self.shape)  # (m, L*2*H*d) -> (m, L, 2, H, d)
        return self.prefix

    @torch.no_grad()
    def set_prefix(self, prefix: torch.Tensor) -> None:
        """Copy `prefix` (m, L, 2, H, d) into the plain parameter."""
        if self.projection:
            raise TunelabError("a reparameterised prefix is set through its MLP, not directly")
        self.prefix.copy_(prefix.to(dtype=torch.float32).reshape(self.shape))

    def folded(self) -> torch.Tensor:
        """The prefix as PEFT stores it: (m, L*2*H*d), float32, laid out [layer][key|value][head][dim]."""
        with torch.no_grad():
            return self().float().reshape(self.num_virtual_tokens, -1).contiguous()

    def layer_key_values(self, batch_size: int, dtype: torch.dtype, device: torch.device) -> list[kv.LayerKV]:
        """Per layer (keys, values), each (B, H, m, d), in the model's dtype; gradients flow back."""
        prefix = self().to(device=device, dtype=dtype)  # (m, L, 2, H, d)
        prefix = prefix.permute(1, 2, 3, 0, 4)  # (L, 2, H, m, d)
        return [
            (
                layer[0].unsqueeze(0).expand(batch_size, -1, -1, -1),  # (B, H, m, d)
                layer[1].unsqueeze(0).expand(batch_size, -1, -1, -1),  # (B, H, m, d)
            )
            for layer in prefix
        ]


def apply(model: PreTrainedModel, options: Options) -> None:
    """Freeze the model, add the prefix (`model.prefix_encoder`, trainable) and wrap `model.forward`."""
    if hasattr(model, ENCODER_NAME):
        raise TunelabError(f"{type(model).__name__} already has a prefix ({ENCODER_NAME})")
    if "forward" in model.__dict__:
        raise TunelabError(
            f"{type(model).__name__}.forward is already wrapped; apply prefix tuning to a plain model"
        )
    freeze_all(model)
    num_layers, num_kv_heads, head_dim = kv_shape(model)
    encoder = PrefixEncoder(
        options.num_virtual_tokens,
        num_layers,
        num_kv_heads,
        head_dim,
        (options.encoder_hidden_size or num_kv_heads * head_dim) if options.prefix_projection else None,
    ).to(model.device)
    if options.init_text is not None and model.device.type != "meta":  # meta: a plan, no values
        encoder.set_prefix(text_key_values(model, options.init_text, options.num_virtual_tokens))
    model.add_module(ENCODER_NAME, encoder)
    model.forward = types.MethodType(_wrap_forward(type(model).forward), model)


def remove(model: PreTrainedModel) -> None:
    """Undo `apply`: drop the prefix and restore the model's own forward."""
    _encoder(model)
    del model._modules[ENCODER_NAME]
    del model.forward


@contextmanager
def disabled(model: PreTrainedModel) -> Iterator[PreTrainedModel]:
    """Within this block the model computes the base model's outputs (no prefix); yields the model.
    `RuntimeError` when the model has no prefix."""
    encoder = _encoder(model)
    previous = encoder.enabled
    encoder.enabled = False
    try:
        yield model
    finally:
        encoder.enabled = previous


def save(model: PreTrainedModel, options: Options, out_dir: Path, base_model: str) -> None:
    """Write the prefix in PEFT's PREFIX_TUNING format (the MLP, if any, folded into vectors)."""
    encoder = _encoder(model)
    m, num_layers, _, num_kv_heads, head_dim = encoder.shape
    config = {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": m,
        "token_dim": num_kv_heads * head_dim,
        "num_layers": num_layers,
        "num_attention_heads": num_kv_heads,
        "num_transformer_submodules": 1,
        "prefix_projection": False,
        "encoder_hidden_size": encoder.transform[0].out_features
        if encoder.projection
        else num_kv_heads * head_dim,
        "init_weights": None,
        "base_model_name_or_path": base_model,
        "inference_mode": True,
        "modules_to_save": None,
        "revision": None,
        "auto_mapping": None,
    }
    write_adapter_folder(Path(out_dir), config, {SAVED_NAME: encoder.folded()})


def load(model: PreTrainedModel, adapter_dir: Path, trainable: bool = False) -> None:
    """Apply the prefix saved in `adapter_dir` (by `save` or by PEFT) to `model`, in place.

    PEFT saves `prompt_embeddings` already folded even when it trained with `prefix_projection`,
    so both cases load as plain vectors. The whole model is frozen afterwards unless `trainable`,
    which leaves the prefix (`prefix_encoder.prefix`) trainable.
    """
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    if config.get("peft_type") != "PREFIX_TUNING":
        raise TunelabError(
            f"{adapter_dir}: not a prefix-tuning adapter (peft_type {config.get('peft_type')!r})"
        )
    if config.get("num_transformer_submodules", 1) != 1:
        raise TunelabError(f"{adapter_dir}: encoder-decoder prefixes are not supported")
    expected = tuple(config_field(config, adapter_dir, key, "int") for key in SHAPE_FIELDS)
    m = config_field(config, adapter_dir, "num_virtual_tokens", "int")
    options = options_from_config(Options, {"num_virtual_tokens": m, "init_text": None}, adapter_dir)
    tensors = read_adapter_weights(adapter_dir)
    num_layers, num_kv_heads, head_dim = kv_shape(model)
    found = (num_layers, num_kv_heads, num_kv_heads * head_dim)
    if expected != found:
        raise TunelabError(
            f"{adapter_dir}: prefix for (layers, kv heads, token_dim) = {expected}, but {type(model).__name__} "
            f"has {found}"
        )
    apply(model, options)
    folded_view = model.prefix_encoder.prefix.detach().view(m, -1)  # (m, L*2*H*d), shares storage
    load_into({SAVED_NAME: folded_view}, tensors, str(adapter_dir / WEIGHTS_FILE))
    if not trainable:
        freeze_all(model)


def kv_shape(model: PreTrainedModel) -> tuple[int, int, int]:
    """(L, H_kv, d): layers, key/value heads and head size, read from the keys the model caches."""
    with disabled(model) if hasattr(model, ENCODER_NAME) else nullcontext():
        layers = kv.model_key_values(model, torch.zeros(1, 1, dtype=torch.long, device=model.device))
    shapes = {tuple(keys.shape[1:2] + keys.shape[3:]) for keys, _ in layers}
    shapes |= {tuple(values.shape[1:2] + values.shape[3:]) for _, values in layers}
    if len(shapes) != 1:
        raise TunelabError(
            f"prefix tuning needs the same key/value shape in every layer; {type(model).__name__} has {sorted(shapes)}"
        )
    ((num_kv_heads, head_dim),) = shapes
    return len(layers), num_kv_heads, head_dim


def text_key_values(model: PreTrainedModel, text: str, num_virtual_tokens: int) -> torch.Tensor:
    """The model's keys/values for the first m tokens of `text` (cycled when shorter): (m, L, 2, H, d).

    The tokenizer is the one saved with the model (`model.name_or_path`).
    """
    from tunelab.models import load_tokenizer

    if not model.name_or_path:
        raise TunelabError("init_text needs the model's tokenizer, but the model has no name_or_path")
    ids = load_tokenizer(model.name_or_path)(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise TunelabError(f"init_text {text!r} gives no tokens")
    ids = (ids * (num_virtual_tokens // len(ids) + 1))[:num_virtual_tokens]
    layers = kv.model_key_values(model, torch.tensor([ids], device=model.device))
    stacked = torch.stack([torch.stack([k[0], v[0]]) for k, v in layers])  # (L, 2, H, m, d)
    return stacked.permute(3, 0, 1, 2, 4).float()  # (m, L, 2, H, d)


def _encoder(model: nn.Module) -> PrefixEncoder:
    """The model's `PrefixEncoder`; `RuntimeError` (a programming error) when it has none."""
    encoder = getattr(model, ENCODER_NAME, None)
    if not isinstance(encoder, PrefixEncoder):
        raise RuntimeError(f"prefix: {type(model).__name__} holds no prefix (apply or load prefix first)")
    return encoder


def _wrap_forward(class_forward):
    """`model.forward` for a prefix-tuned model of this class (the class's forward, prefix added).

    A function of `model` bound with `types.MethodType`, so that `copy.deepcopy(model)` rebinds it
    to the copy; `functools.wraps` keeps the signature that `generate` inspects.
    """
    signature = inspect.signature(class_forward)
    cache_name = kv.cache_argument(signature)

    @functools.wraps(class_forward)
    def forward(model, *args, **kwargs):
        if not model.prefix_encoder.enabled:
            return class_forward(model, *args, **kwargs)
        bound = signature.bind(model, *args, **kwargs)
        inputs = {}
        for name, value in list(bound.arguments.items())[1:]:
            if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                inputs.update(value)
            else:
                inputs[name] = value
        if cache_name != kv.LEGACY_CACHE_ARGUMENT and kv.LEGACY_CACHE_ARGUMENT in inputs:
            legacy = inputs.pop(kv.LEGACY_CACHE_ARGUMENT)  # the old name, still accepted by transformers
            inputs[cache_name] = legacy if inputs.get(cache_name) is None else inputs[cache_name]
        return _prefixed_forward(model, class_forward, inputs, cache_name)

    return forward


def _prefixed_forward(model: PreTrainedModel, class_forward, inputs: dict, cache_name: str) -> object:
    """Run `class_forward` with the prefix in the cache (`_prefix_cache`), the mask extended and
    positions shifted (`_shift_mask_and_positions`); check that every layer saw the prefix."""
    encoder: PrefixEncoder = model.prefix_encoder
    tokens = inputs.get("input_ids") if inputs.get("input_ids") is not None else inputs.get("inputs_embeds")
    if tokens is None:
        raise TunelabError("prefix tuning needs input_ids or inputs_embeds")
    cache = _prefix_cache(model, encoder, inputs, cache_name, tokens)
    _shift_mask_and_positions(inputs, encoder.num_virtual_tokens, kv.cache_length(cache), tokens.shape[:2])

    checkpointing = kv.is_prefix_only(cache) and kv.checkpointing_active(model)
    with kv.cache_kept_under_checkpointing(model) if checkpointing else nullcontext():
        outputs = class_forward(model, **inputs)

    missed = kv.layers_missed(cache, encoder.num_layers)
    if missed:
        raise TunelabError(
            f"the prefix did not reach layers {missed} of {type(model).__name__}: this transformers version "
            "dropped the cache on the way (see tunelab/methods/prefix_cache.py)"
        )
    if kv.is_prefix_only(cache):  # it lacks this forward's keys: nobody may continue from it
        outputs = kv.drop_output_cache(outputs, cache)
    return outputs


def _prefix_cache(
    model: PreTrainedModel, encoder: PrefixEncoder, inputs: dict, cache_name: str, tokens: torch.Tensor
):
    """The cache the forward runs with, put into `inputs[cache_name]`:

    - no cache given: a training step (train mode, gradients on) or `use_cache=False` gets a
      prefix-only cache, not returned; otherwise a growing cache holding the prefix, returned;
    - an empty cache given (`generate`'s first forward): filled with the prefix first;
    - a cache holding our prefix given: used as it is (later forwards of `generate`).
    """
    batch_size = tokens.shape[0]
    training_step = model.training and torch.is_grad_enabled()
    cache = inputs.get(cache_name)
    if cache is None:
        use_cache = inputs.get("use_cache")
        grow = bool(model.config.use_cache if use_cache is None else use_cache) and not training_step
        cache = kv.new_prefix_cache(encoder.layer_key_values(batch_size, model.dtype, tokens.device), grow)
        inputs[cache_name] = cache
        inputs["use_cache"] = grow  # attention layers read a given cache either way
        return cache
    if kv.is_prefix_only(cache):
        raise TunelabError(
            "the given cache comes from a training forward and does not hold its tokens; "
            "for a reusable cache run the forward in eval mode or under torch.no_grad()"
        )
    if training_step and kv.checkpointing_active(model):
        raise TunelabError(
            "prefix tuning cannot extend a given cache in training with gradient checkpointing"
        )
    if kv.prefix_tokens_in(cache) is None:
        if not kv.is_cache(cache) or kv.cache_length(cache) != 0:
            raise TunelabError(
                "the given cache holds positions but not this model's prefix; pass an empty cache or none"
            )
        kv.fill_cache(cache, encoder.layer_key_values(batch_size, model.dtype, tokens.device))
    return cache


def _shift_mask_and_positions(inputs: dict, m: int, past: int, shape: tuple[int, int]) -> None:
    """Make room for the m prefix positions before the real tokens, in place. `past`: positions
    already in the cache (prefix + earlier real tokens); `shape`: (B, T) of the new tokens.

    - A 2-D mask over the real tokens gets m ones in front; one already that long is kept.
    - Position ids: given ones + m; else from the mask (cumsum - 1) + m; else the model's own
      count from the cache length (m + earlier tokens).
    """
    batch_size, length = shape
    mask = inputs.get("attention_mask")
    real_mask = None
    if mask is not None:
        if mask.ndim != 2:
            raise TunelabError(f"prefix tuning takes a 2-D attention_mask (batch, tokens), got {mask.ndim}-D")
        if mask.shape[1] == past - m + length:  # covers the real tokens only: add the prefix
            real_mask = mask
            inputs["attention_mask"] = torch.cat([mask.new_ones(batch_size, m), mask], dim=1)
        elif mask.shape[1] == past + length:  # already covers the prefix
            real_mask = mask[:, m:]
        else:
            raise TunelabError(
                f"attention_mask has {mask.shape[1]} columns; expected {past - m + length} (earlier and new tokens)"
            )

    position_ids = inputs.get("position_ids")
    if position_ids is not None and mask is None and (torch.diff(position_ids, dim=-1) != 1).any():
        # transformers reads restarting position ids as packed documents only when no cache is
        # given; with the prefix in the cache the documents would attend to each other.
        raise TunelabError("prefix tuning does not support packed sequences (position ids that restart)")
    if position_ids is not None:
        inputs["position_ids"] = position_ids + m
    elif real_mask is not None:
        positions = (real_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, past - m + T)
        inputs["position_ids"] = positions[:, -length:] + m  # (B, T)
    # else: the model counts from the cache length, m + earlier tokens.

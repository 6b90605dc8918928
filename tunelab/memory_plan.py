"""Expected peak memory of a training run per device, before anything loads (`tunelab inspect`).

From the model built on the meta device with the method applied (`tunelab.inspection`) and the run
config, in bytes per device, for N processes (`train.strategy: fsdp` shards the parts marked *):

    weights*      frozen parameters at `model.dtype` (2 or 4 bytes each). Quantised (`model.quantization`):
                  the decoder's linear weights take 4 bits, 0.5 byte each, + a float32 absmax per
                  block of 64 (with `double_quant` an 8-bit absmax per 64 + a float32 per 256 of them),
                  or 8 bits, 1 byte each + a float32 scale per output row; embeddings, norms and the
                  LM head stay at `model.dtype`. Trainable parameters are counted on the next line.
    trainable*    P_t parameters at their training dtype (float32 under bf16/fp16 autocast: tunelab
                  casts them in place, `prepare_model`, no second copy; LoRA/DoRA/adapter weights are
                  float32 on a half-precision base) + AdamW's two moments (`zeros_like(p)`: same
                  dtype): 3 x P_t x bytes.
    gradients*    P_t x bytes, allocated during backward while the saved activations are freed (the
                  loop sets them to None after each step).
    activations   saved for backward, for tokens = `train.batch_size` x `data.max_length`, the longest
                  micro-batch (with `data.packing` its examples make one padding-free row of at most
                  that many tokens: the same bound, a lower typical peak), or
                  `train.max_micro_batch_tokens` when smaller (a forward pass holds at most that many),
                  a = 4 bytes (2 under bf16/fp16 autocast), per token:
                    per decoder layer (Llama-style: pre-norm attention + gated MLP)
                      A = 9 H + 3 H_kv + 4 I          (gated MLP; 2 I for a plain one)
                        the norms' inputs and outputs 4 H; q, k, v and the rotated q, k 2 H + 3 H_kv;
                        attention's output, o_proj's input and the rest ~3 H; gate, up, act(gate)
                        and their product 4 I. On the benchmark's model (GQA, padded batch) the
                        tensors autograd saves came within 5% of L x A (saved-tensor hooks)
                      + 7 r per LoRA-wrapped linear (the rank-r hidden), and with DoRA
                      + 2 (3 H + 2 H_kv + 2 I) (the base output and the update kept for m / n);
                      LoRA dropout keeps each wrapped linear's dropped input and its one-byte mask
                    saved, without checkpointing   L x A
                    saved, with checkpointing      L x H (each block's input)
                    saved, checkpointing every N-th block (`model.checkpoint_every`)
                                                   k x H + (L - k) x A,  k = ceil(L / N)
                  and the embedding output and final norm 3 H, the chunked loss's dL/dh, H float32.
    working       backward's working set for one block, per token: W = 2 I + 4 H (the gradients of
                  its tensors), + A with checkpointing (the block recomputed).
    loss          chunked (`train.chunked_loss`): logits and their gradient for one chunk,
                  2 x min(C, tokens) x V x 4 bytes; unchunked: logits, their shifted float copy,
                  log-softmax and its gradient, 4 x tokens x V x 4 bytes.
    transient     the largest single weight materialised at once: a quantised linear dequantised to
                  float32 for its matmul, or DoRA's W + s B A for its norm; under FSDP the largest
                  block gathered whole (its parameters, unsharded).

The peak is the larger of two moments, at the loss (every saved activation and the loss chunk) and
at the end of backward (all gradients and one block's working set):

    total = weights + trainable + max(activations + loss, gradients + working) + transient

It is an estimate of what the tensors need: the allocator's slack, CUDA's context (~0.5 GB) and
the tokenizer and data are not in it. Checked against measured peaks (`benchmarks/memory_plan.py`,
figures in BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from torch import nn

from tunelab.config import RunConfig
from tunelab.errors import TunelabError

BLOCK_4BIT = 64
"""Weights per absmax of bitsandbytes' 4-bit quantisation."""
BLOCK_DOUBLE = 256
"""Absmax values per float32 scale with double quantisation."""

UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


@dataclass
class Shape:
    """What the activation formula needs of the architecture."""

    hidden: int
    layers: int
    kv_hidden: int
    intermediate: int
    vocab: int
    gated: bool
    lora_modules_per_layer: int = 0
    lora_rank: int = 0
    dora: bool = False
    dropout_inputs: int = 0
    """Input features of one block's LoRA layers with dropout: each keeps its dropped input and mask."""


@dataclass
class MemoryPlan:
    """Bytes per device, by part; `total` is the peak they add up to (module docstring)."""

    weights: int
    trainable: int
    activations: int
    loss: int
    transient: int
    tokens: int
    notes: list[str] = field(default_factory=list)

    gradients: int = 0
    working: int = 0

    @property
    def total(self) -> int:
        """The peak: at the loss, or at the end of backward (module docstring)."""
        forward = self.activations + self.loss
        backward = self.gradients + self.working
        return self.weights + self.trainable + max(forward, backward) + self.transient


def parse_size(text: str) -> int:
    """`24GB`, `24 GiB`, `500MB`, `1e9` -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = (match.group(2) or "B").upper() if match else ""
    if not match or unit not in UNITS:
        raise TunelabError(f"--device-memory: cannot read {text!r}; write e.g. 24GB or 80GiB")
    return int(float(match.group(1)) * UNITS[unit])


def fmt(num_bytes: float) -> str:
    """Bytes as GB (or MB below one GB), decimal units as card makers use them."""
    if abs(num_bytes) >= 10**9:
        return f"{num_bytes / 10**9:.2f} GB"
    return f"{num_bytes / 10**6:.0f} MB"


def _quantized_bytes(numel: int, rows: int, bits: int, double_quant: bool) -> int:
    """Bytes of one quantised weight of `numel` values in `rows` output rows (module docstring)."""
    if bits == 8:
        return numel + 4 * rows
    blocks = -(-numel // BLOCK_4BIT)
    scales = blocks + 4 * -(-blocks // BLOCK_DOUBLE) if double_quant else 4 * blocks
    return -(-numel // 2) + scales


def _is_quantized(module_name: str, module: nn.Module, layers_prefix: str) -> bool:
    """bitsandbytes quantises the decoder's `nn.Linear` layers (not embeddings, LM head, score)."""
    return isinstance(module, nn.Linear) and module_name.startswith(layers_prefix + ".")


def weight_bytes(model: nn.Module, config: RunConfig, layers_prefix: str) -> tuple[int, int, int, int]:
    """(frozen weights, trainable parameters + AdamW moments, their gradients, largest quantised
    linear as float32) in bytes, for one unsharded copy. `model` is built at `model.dtype`."""
    quant = config.model.quantization
    owner = {}
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            owner[id(p)] = (module_name, module, name)
    frozen = trainable = gradients = largest = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:  # tied embeddings count once
            continue
        seen.add(id(p))
        module_name, module, name = owner[id(p)]
        if p.requires_grad:  # float32 master weights under autocast (`prepare_model`)
            size = 4 if config.train.precision != "fp32" else p.element_size()
            trainable += 3 * p.numel() * size  # parameter, exp_avg, exp_avg_sq
            gradients += p.numel() * size
        elif quant.bits and name == "weight" and _is_quantized(module_name, module, layers_prefix):
            frozen += _quantized_bytes(p.numel(), p.shape[0], quant.bits, quant.double_quant)
            largest = max(largest, 4 * p.numel())
        else:
            frozen += p.numel() * p.element_size()
    return frozen, trainable, gradients, largest


def model_shape(model: nn.Module, layers_prefix: str, layers: nn.ModuleList) -> Shape:
    """Hidden, layer, key/value and MLP widths and vocabulary, read off the built model."""
    cfg = model.config.get_text_config()
    hidden = cfg.hidden_size
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    intermediate = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * hidden
    names = [name for name, _ in layers[0].named_modules()]
    gated = any(name.split(".")[-1] in ("gate_proj", "gate_up_proj", "w1") for name in names)
    wrapped = [m for m in layers[0].modules() if type(m).__name__ == "LoRALinear"]
    dropped = [m for m in wrapped if isinstance(m.lora_dropout, nn.Dropout)]
    return Shape(
        hidden=hidden,
        layers=len(layers),
        kv_hidden=kv_heads * head_dim,
        intermediate=intermediate,
        vocab=cfg.vocab_size,
        gated=gated,
        lora_modules_per_layer=len(wrapped),
        lora_rank=wrapped[0].r if wrapped else 0,
        dora=any(m.use_dora for m in wrapped),
        dropout_inputs=sum(m.in_features for m in dropped),
    )


def per_layer_activations(shape: Shape) -> int:
    """Values saved for backward per token by one decoder block: A of the module docstring."""
    h, kv, i = shape.hidden, shape.kv_hidden, shape.intermediate
    values = 9 * h + 3 * kv + (4 if shape.gated else 2) * i
    values += 7 * shape.lora_rank * (shape.lora_modules_per_layer > 0)
    if shape.dora:
        values += 2 * (3 * h + 2 * kv + 2 * i)
    return values


def activation_bytes(shape: Shape, tokens: int, checkpointed: int, act_bytes: int) -> tuple[int, int]:
    """(activations saved for backward, backward's working set) for `tokens` tokens, with
    `checkpointed` of the decoder blocks checkpointed (module docstring)."""
    block = per_layer_activations(shape) * act_bytes + shape.dropout_inputs * (act_bytes + 1)  # + bool mask
    working = (2 * shape.intermediate + 4 * shape.hidden) * act_bytes
    outside = 3 * shape.hidden * act_bytes + 4 * shape.hidden  # embedding, final norm; dL/dh float32
    saved = checkpointed * shape.hidden * act_bytes + (shape.layers - checkpointed) * block
    if checkpointed:
        working += block  # the block recomputed
    return tokens * (saved + outside), tokens * working


def checkpointed_layers(config: RunConfig, layers: int) -> int:
    """Decoder blocks checkpointed: none, or every `model.checkpoint_every`-th, k = ceil(L / N)."""
    if not config.model.gradient_checkpointing:
        return 0
    return -(-layers // config.model.checkpoint_every)


def loss_bytes(shape: Shape, tokens: int, chunked: bool, chunk_size: int) -> int:
    """Logits and their gradient: one chunk, or all of them (module docstring)."""
    if chunked:
        return 2 * min(chunk_size, tokens) * shape.vocab * 4
    return 4 * tokens * shape.vocab * 4


def plan(model: nn.Module, config: RunConfig, world_size: int = 1) -> MemoryPlan:
    """The expected peak per device of training `model` (meta device, method applied) under `config`
    on `world_size` processes."""
    from tunelab.methods.inject import decoder_layers

    if world_size < 1:
        raise TunelabError(f"--world-size must be at least 1, got {world_size}")
    layers_prefix, layers = decoder_layers(model)
    shape = model_shape(model, layers_prefix, layers)
    frozen, trainable, gradients, largest_quantized = weight_bytes(model, config, layers_prefix)
    tokens = config.train.batch_size * config.data.max_length
    if config.train.max_micro_batch_tokens is not None:
        tokens = min(tokens, config.train.max_micro_batch_tokens)
    act_bytes = 4 if config.train.precision == "fp32" else 2
    checkpointed = checkpointed_layers(config, shape.layers)
    activations, working = activation_bytes(shape, tokens, checkpointed, act_bytes)
    loss = loss_bytes(shape, tokens, config.train.chunked_loss, config.train.loss_chunk_size)
    transient = largest_quantized
    if shape.dora and not config.model.quantization.bits:
        transient = max(4 * m.weight.numel() for m in layers[0].modules() if isinstance(m, nn.Linear))
    notes = []
    shards = world_size if config.train.strategy == "fsdp" else 1
    if shards > 1:
        frozen, trainable, gradients = frozen // shards, trainable // shards, gradients // shards
        block = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
        transient += block * 4
        notes.append(f"fsdp over {shards} processes: weights and trainable state sharded, one block gathered")
    return MemoryPlan(frozen, trainable, activations, loss, transient, tokens, notes, gradients, working)


def describe_plan(memory: MemoryPlan, config: RunConfig) -> str:
    """The lines `tunelab inspect` prints for a plan."""
    quant = config.model.quantization
    weights = f"{quant.bits}-bit" if quant.bits else config.model.dtype
    ckpt = "off"
    if config.model.gradient_checkpointing:
        every = config.model.checkpoint_every
        ckpt = "on" if every == 1 else f"every {every} layers"
    loss = f"chunked, {config.train.loss_chunk_size}" if config.train.chunked_loss else "full logits"
    rows = [
        (f"weights ({weights})", memory.weights),
        ("trainable + AdamW moments", memory.trainable),
        (f"activations saved ({memory.tokens:,d} tokens, checkpointing {ckpt})", memory.activations),
        (f"loss ({loss})", memory.loss),
        ("gradients (built in backward)", memory.gradients),
        ("backward working set (one block)", memory.working),
        ("largest tensor in flight", memory.transient),
    ]
    width = max(len(label) for label, _ in rows)
    lines = ["expected peak memory per device:"]
    lines += [f"  {label:<{width}}  {fmt(value):>10}" for label, value in rows]
    lines.append(f"  {'total at the peak':<{width}}  {fmt(memory.total):>10}")
    lines += [f"  ({note})" for note in memory.notes]
    return "\n".join(lines)


def alternatives(config: RunConfig) -> list[tuple[str, RunConfig]]:
    """The switches that lower memory, each as the changed config: checkpointing, 4 bits (for an
    adapter method), a micro-batch halved with grad_accum doubled (same step), LoRA for full."""
    out = []
    model, train, method = config.model, config.train, config.method
    if not model.gradient_checkpointing:
        out.append(
            ("model.gradient_checkpointing=true", _changed(config, model=dict(gradient_checkpointing=True)))
        )
    if method.name in ("lora", "adapter", "prefix") and model.quantization.bits != 4:
        quant = dataclasses.replace(model.quantization, bits=4)
        out.append(("model.quantization.bits=4", _changed(config, model=dict(quantization=quant))))
    batch = train.batch_size
    while batch > 1:
        batch //= 2
        accum = train.grad_accum * train.batch_size // batch
        change = f"train.batch_size={batch} train.grad_accum={accum}"
        out.append((change, _changed(config, train=dict(batch_size=batch, grad_accum=accum))))
    if method.name == "full":
        out.append(("method.name=lora (r=16, all linear layers)", _changed(config, method="lora")))
    return out


def _changed(config: RunConfig, model=None, train=None, method=None) -> RunConfig:
    new = dataclasses.replace(config)
    if model:
        new.model = dataclasses.replace(config.model, **model)
    if train:
        new.train = dataclasses.replace(config.train, **train)
    if method:
        from tunelab.methods import get_method

        options = get_method(method).Options(r=16, alpha=32, target_modules="all-linear")
        new.method = dataclasses.replace(config.method, name=method, options=options)
    return new

"""Bottleneck adapters: small trainable down-/up-projections inserted in each decoder layer.

Each adapter computes f(h) = W_up · act(W_down · h + b_down) + b_up with a bottleneck of b units
(given directly, or as `reduction_factor` r = d / b), see `adapter_module` for the maths and the
initialisation (W_up = 0, so a fresh adapter leaves the model's outputs unchanged). The base model
is frozen; only the adapters (and, with `train_layer_norms`, the layer norms) train. On a
bfloat16/float16 base the adapters are float32 (as LoRA's A and B), computing on the half hidden
states cast up and handing their output back in the stream's dtype.

Placements (where f goes in a pre-norm decoder layer x -> x + Attn(LN(x)) -> x + FFN(LN(x))):

- `houlsby` (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP"): two adapters
  per layer, serial, on the attention output projection and on the feed-forward output, before
  the residual additions: a = o_proj(...); a <- a + s·f1(a); m = FFN(LN(x)); m <- m + s·f2(m).
- `pfeiffer` (Pfeiffer et al. 2020, "AdapterFusion"): one serial adapter per layer, on the
  feed-forward output only: m <- m + s·f(m).
- `parallel` (He et al. 2021, "Towards a Unified View of Parameter-Efficient Transfer Learning"):
  one adapter beside the feed-forward block, fed by the block's input: m = FFN(u) + s·f(u), u = LN(x).

Departures from the papers: Houlsby and Pfeiffer wrote for post-norm BERT, where Pfeiffer's adapter
also sees the residual and the layer norm; here every adapter wraps a module of a pre-norm decoder,
the serial ones adding their own residual. The adapted modules are found by name in each decoder
layer (`self_attn.o_proj` or GPT-2's `attn.c_proj`; `mlp`), or as given by `attn_output_module` /
`mlp_module`. Each is replaced by an `AdapterLayer` that keeps the original as `base_layer`
(no forward hooks, so the model stays friendly to `torch.compile`).

Trainable parameters: layers · (adapters_per_layer · (2·d·b + b + d) + trained norm parameters),
see `trainable_parameter_formula`. The artifact is `adapter_config.json` ("tunelab_method":
"adapter") plus `adapter_model.safetensors` holding only the trained tensors. With the adapters
off (and trained layer norms swapped back) the model is the base model: `DISABLES_TO_BASE`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from tunelab.errors import TunelabError
from tunelab.methods import freeze_all
from tunelab.methods.adapter_files import (
    WEIGHTS_FILE,
    config_field,
    options_from_config,
    read_adapter_config,
    read_adapter_weights,
    write_adapter_folder,
)
from tunelab.methods.adapter_module import (
    ACTIVATIONS,
    ADAPTERS_PER_LAYER,
    AdapterLayer,
    BottleneckAdapter,
    trainable_parameter_formula,
)
from tunelab.methods.inject import decoder_layers, select_layers
from tunelab.weights import load_into

__all__ = [
    "Options",
    "apply",
    "save",
    "load",
    "disabled",
    "DISABLES_TO_BASE",
    "method_parameters",
    "bottleneck_size",
    "trainable_parameter_formula",
    "AdapterLayer",
    "BottleneckAdapter",
]

# Paths inside a decoder layer, tried in order.
ATTN_OUTPUT_CANDIDATES = ("self_attn.o_proj", "attn.c_proj")  # Llama, Qwen2, Mistral, Gemma, Phi-3; GPT-2
MLP_CANDIDATES = ("mlp",)
DEFAULT_REDUCTION_FACTOR = 16.0
BASE_NORM_PREFIX = "adapter_base_"  # non-persistent buffers holding the base model's norm weights
DISABLES_TO_BASE = True


@dataclass
class Options:
    placement: Literal["houlsby", "pfeiffer", "parallel"] = "pfeiffer"
    """Where the adapters go: `houlsby` (after attention output and feed-forward, 2 per layer),
    `pfeiffer` (after the feed-forward block, 1 per layer), `parallel` (beside the feed-forward block)."""
    bottleneck: int | None = None
    """Bottleneck size b. Give this or `reduction_factor`, not both."""
    reduction_factor: float | None = None
    """b = hidden_size // reduction_factor (16 when neither this nor `bottleneck` is given)."""
    activation: Literal["relu", "gelu", "gelu_tanh", "silu", "tanh"] = "relu"
    """Nonlinearity between the down- and up-projection."""
    scale: float = 1.0
    """s in y + s·f(.); He et al. use 4 for the parallel adapter."""
    dropout: float = 0.0
    """Dropout on the bottleneck activations, in training mode only."""
    train_layer_norms: bool = False
    """Also train the layer norms of the adapted layers (Houlsby et al. do)."""
    layers: list[int] | None = None
    """Put adapters only in these decoder layers (negative counts from the end); default all."""
    last_layers: int | None = None
    """Put adapters only in the last N decoder layers."""
    attn_output_module: str | None = None
    """Path of the attention output projection inside a decoder layer (default: `self_attn.o_proj`
    or `attn.c_proj`, whichever exists). Used by `houlsby` only."""
    mlp_module: str | None = None
    """Path of the feed-forward block (or its output projection) inside a decoder layer (default `mlp`)."""

    def __post_init__(self):
        if self.placement not in ADAPTERS_PER_LAYER:
            raise ValueError(f"placement must be one of {sorted(ADAPTERS_PER_LAYER)}, not {self.placement!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, not {self.activation!r}")
        if self.bottleneck is not None and self.reduction_factor is not None:
            raise ValueError("give either bottleneck or reduction_factor, not both")
        if self.bottleneck is not None and self.bottleneck < 1:
            raise ValueError(f"bottleneck must be >= 1, not {self.bottleneck}")
        if self.reduction_factor is not None and self.reduction_factor <= 0:
            raise ValueError(f"reduction_factor must be > 0, not {self.reduction_factor}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), not {self.dropout}")
        if self.layers is not None and self.last_layers is not None:
            raise ValueError("give either layers or last_layers, not both")


def hidden_size(model: nn.Module) -> int:
    """The width d of the model's residual stream (`hidden_size` of its text config)."""
    return model.config.get_text_config().hidden_size


def bottleneck_size(options: Options, hidden: int) -> int:
    """b: `bottleneck`, else max(1, hidden // reduction_factor)."""
    if options.bottleneck is not None:
        return options.bottleneck
    factor = options.reduction_factor if options.reduction_factor is not None else DEFAULT_REDUCTION_FACTOR
    return max(1, int(hidden // factor))


def _target_paths(model: nn.Module, layer: nn.Module, index: int, options: Options) -> list[str]:
    """The paths inside decoder layer `index` that get an adapter under `options.placement`."""
    wanted = [("feed-forward block", "mlp_module", options.mlp_module, MLP_CANDIDATES)]
    if options.placement == "houlsby":
        wanted.insert(
            0,
            (
                "attention output projection",
                "attn_output_module",
                options.attn_output_module,
                ATTN_OUTPUT_CANDIDATES,
            ),
        )
    module_names = {name for name, _ in layer.named_modules() if name}
    paths = []
    for what, option, configured, defaults in wanted:
        tried = [configured] if configured else list(defaults)
        found = [name for name in tried if name in module_names]
        if not found:
            listing = ", ".join(sorted(module_names))
            raise TunelabError(
                f"adapter: cannot find the {what} in decoder layer {index} of {type(model).__name__}: "
                f"tried {tried}; set `{option}` to its path inside a layer, one of: {listing}"
            )
        paths.append(found[0])
    return paths


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(
        ("RMSNorm", "LayerNorm")
    )


def _adapted_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(qualified name, block) of each decoder layer holding an adapter."""
    prefix, blocks = decoder_layers(model)
    for i, block in enumerate(blocks):
        if any(isinstance(m, AdapterLayer) for m in block.modules()):
            yield f"{prefix}.{i}", block


def method_parameters(model: nn.Module, train_layer_norms: bool) -> dict[str, nn.Parameter]:
    """Name -> parameter of everything the method trains: the adapters and, with
    `train_layer_norms`, the norms of the adapted layers. Used to freeze, save, load and count."""
    out = {}
    for layer_name, block in _adapted_layers(model):
        for name, module in block.named_modules():
            if isinstance(module, AdapterLayer):
                for pname, p in module.adapter.named_parameters():
                    out[f"{layer_name}.{name}.adapter.{pname}"] = p
            elif train_layer_norms and _is_norm(module):
                for pname, p in module.named_parameters(recurse=False):
                    out[f"{layer_name}.{name}.{pname}"] = p
    return out


def apply(model: nn.Module, options: Options) -> None:
    """Insert adapters in the chosen decoder layers and freeze everything else."""
    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        raise TunelabError("adapter: the model already has adapters")
    _, blocks = decoder_layers(model)
    chosen = select_layers(len(blocks), options.layers, options.last_layers)
    d = hidden_size(model)
    b = bottleneck_size(options, d)
    reference = next(model.parameters())
    targets = [
        (blocks[i], path) for i in sorted(chosen) for path in _target_paths(model, blocks[i], i, options)
    ]
    freeze_all(model)
    for block, path in targets:
        parent_path, _, child = path.rpartition(".")
        parent = block.get_submodule(parent_path) if parent_path else block
        base = getattr(parent, child)
        like = next(base.parameters(), reference)
        # float32 beside a half-precision base, as LoRA's A and B (`adapter_module.BottleneckAdapter.forward`)
        dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
        adapter = BottleneckAdapter(d, b, options.activation, options.dropout).to(like.device, dtype)
        wrapper = AdapterLayer(base, adapter, options.scale, options.placement == "parallel")
        setattr(parent, child, wrapper.train(base.training))  # new modules start in training mode
    if options.train_layer_norms:
        for _, block in _adapted_layers(model):
            for module in block.modules():
                if _is_norm(module):
                    for pname, p in list(module.named_parameters(recurse=False)):
                        module.register_buffer(BASE_NORM_PREFIX + pname, p.detach().clone(), persistent=False)
    for p in method_parameters(model, options.train_layer_norms).values():
        p.requires_grad_(True)


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes the base model's outputs: adapters off and, if layer
    norms were trained, the base norm weights swapped in (by `.data`, so autograd graphs built
    outside the block stay valid); yields the model. Nested use is a no-op. `RuntimeError` when the
    model holds no adapters."""
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
    if not layers:
        raise RuntimeError(f"adapter: {type(model).__name__} holds no adapters (apply or load them first)")
    if not all(layer.enabled for layer in layers):  # already inside `disabled`
        yield model
        return
    norms = [
        (module, name[len(BASE_NORM_PREFIX) :], name)
        for module in model.modules()
        for name, _ in module.named_buffers(recurse=False)
        if name.startswith(BASE_NORM_PREFIX)
    ]

    def swap():
        for module, pname, bname in norms:
            p, base = getattr(module, pname), getattr(module, bname)
            current = p.data
            p.data = base
            setattr(module, bname, current)

    for layer in layers:
        layer.enabled = False
    swap()
    try:
        yield model
    finally:
        swap()
        for layer in layers:
            layer.enabled = True


def _resolved_options(model: nn.Module, options: Options) -> Options:
    """`options` with the bottleneck and layer list made explicit for this model."""
    _, blocks = decoder_layers(model)
    return Options(
        **{
            **asdict(options),
            "bottleneck": bottleneck_size(options, hidden_size(model)),
            "reduction_factor": None,
            "layers": sorted(select_layers(len(blocks), options.layers, options.last_layers)),
            "last_layers": None,
        }
    )


def save(model: nn.Module, options: Options, out_dir: Path, base_model: str) -> None:
    """Write `adapter_config.json` and `adapter_model.safetensors` (only the trained tensors)."""
    resolved = _resolved_options(model, options)
    config = {
        "tunelab_method": "adapter",
        "base_model_name_or_path": base_model,
        "model_class": type(model).__name__,
        "hidden_size": hidden_size(model),
        "adapters_per_layer": ADAPTERS_PER_LAYER[options.placement],
        **asdict(resolved),
        "requested": {"reduction_factor": options.reduction_factor, "last_layers": options.last_layers},
    }
    write_adapter_folder(Path(out_dir), config, method_parameters(model, options.train_layer_norms))


def load(model: nn.Module, adapter_dir: str | Path, trainable: bool = False) -> None:
    """Apply the adapter saved in `adapter_dir` to base `model`, in place.

    The whole model is frozen afterwards unless `trainable`, which leaves the adapters (and trained
    layer norms) trainable, as `apply` does.
    """
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    if config.get("tunelab_method") != "adapter":
        raise TunelabError(
            f"{adapter_dir}: not a tunelab adapter (tunelab_method={config.get('tunelab_method')!r})"
        )
    trained_for = config_field(config, adapter_dir, "hidden_size", "int")
    options = options_from_config(
        Options, {f.name: config[f.name] for f in fields(Options) if f.name in config}, adapter_dir
    )
    if trained_for != hidden_size(model):
        raise TunelabError(
            f"{adapter_dir}: adapter was trained for hidden size {trained_for}, "
            f"but {type(model).__name__} has {hidden_size(model)}"
        )
    tensors = read_adapter_weights(adapter_dir)
    apply(model, options)
    load_into(method_parameters(model, options.train_layer_norms), tensors, str(adapter_dir / WEIGHTS_FILE))
    if not trainable:
        freeze_all(model)

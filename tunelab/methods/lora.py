"""LoRA: train a low-rank update B A beside each chosen frozen linear layer (Hu et al. 2021).

    y = W x + s * B A dropout(x),   A: (r, in), B: (out, r),   s = alpha / r  (alpha / sqrt(r): rsLoRA)

The maths, the initialisation (A Kaiming-uniform, B = 0, so a fresh model equals its base) and
where we depart from the paper are in `tunelab.methods.lora_layer`; the file format (PEFT's) is in
`tunelab.methods.lora_io`. This module chooses the layers and implements the method contract
(`tunelab.methods.Method`): `Options`, `apply`, `save`, `load`, `DISABLES_TO_BASE` (True) and
`disabled`, plus `merge`, `unmerge` and `merge_and_unload` for export.

Targets (`target_modules`): a list of names matched as dotted suffixes (`[q_proj, v_proj]` matches
`model.layers.3.self_attn.q_proj`), a regular expression matched against the whole module name,
or `all-linear`: every `nn.Linear`/`Conv1D` inside the decoder blocks (so not `lm_head`). Each
target is replaced in place by a `LoRALinear` that keeps the original as `base_layer`, so
parameter names read `...q_proj.base_layer.weight`, `...q_proj.lora_A.weight`,
`...q_proj.lora_B.weight`, as in PEFT. Fused projections (Phi-3's `qkv_proj`, `gate_up_proj`) are
plain `nn.Linear` layers and are wrapped as one matrix.

`use_dora` turns each wrapped layer into DoRA (Liu et al. 2024): W' = m (W + s B A) / ||W + s B A||_c
with a trained magnitude m per output row (maths in `tunelab.methods.lora_layer`). On a quantised
base (`model.quantization`, QLoRA) the targets are bitsandbytes' `Linear4bit`/`Linear8bitLt`
layers, wrapped the same way; the base stays quantised and frozen, and `disabled` gives it back
(the reference policy, no second copy). Merging needs a full-precision base (`tunelab merge`
reloads one).

`modules_to_save` names modules trained in full (e.g. `lm_head`, `embed_tokens`, a reward head
`score`): each becomes a `SavedModule` holding the frozen original and a trainable copy.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from torch import nn

from tunelab.errors import TunelabError
from tunelab.methods import freeze_all
from tunelab.methods.adapter_files import WEIGHTS_FILE, options_from_config, write_adapter_folder
from tunelab.methods.adapter_module import BottleneckAdapter
from tunelab.methods.inject import decoder_layers, layer_index, name_matches
from tunelab.methods.lora_io import adapter_tensors, peft_config, read_adapter
from tunelab.methods.lora_layer import SUPPORTED_LAYERS, LoRALinear, SavedModule
from tunelab.weights import load_into

ALL_LINEAR = "all-linear"
DISABLES_TO_BASE = True  # LoRA off (and modules_to_save's originals) is the base model


@dataclass
class Options:
    r: int = 8
    """Rank of the update B A (A: r x in, B: out x r)."""
    alpha: float = 16
    """Scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with `use_rslora`)."""
    dropout: float = 0.0
    """Dropout probability on the input of A (the base path has none)."""
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Layers to adapt: names matched as dotted suffixes (`[q_proj, v_proj]`), a regular expression
    over the full module name, or `all-linear` (every Linear/Conv1D in the decoder blocks)."""
    use_rslora: bool = False
    """Rank-stabilised LoRA: scale by alpha / sqrt(r) instead of alpha / r."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full beside LoRA, by dotted suffix (e.g. `lm_head`, `embed_tokens`, `score`)."""
    init: Literal["kaiming", "gaussian"] = "kaiming"
    """Initialisation of A: Kaiming-uniform (a = sqrt 5, the paper's code) or N(0, 1/r). B starts at 0."""
    bias: Literal["none"] = "none"
    """Which biases train: only `none` is implemented (biases stay frozen)."""
    use_dora: bool = False
    """DoRA: also train a magnitude per output row, W' = m (W + s B A) / ||W + s B A|| (Liu et al. 2024)."""

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be positive, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module (or be 'all-linear')")
        if isinstance(self.target_modules, str) and self.target_modules.lower() == ALL_LINEAR:
            self.target_modules = ALL_LINEAR
        elif isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as err:
                raise ValueError(
                    f"target_modules {self.target_modules!r} is not a valid regular expression: {err}"
                ) from None
        if self.init not in ("kaiming", "gaussian"):
            raise ValueError(f"init must be 'kaiming' or 'gaussian', got {self.init!r}")
        if self.bias != "none":
            raise ValueError(f"bias must be 'none' (training biases is not implemented), got {self.bias!r}")


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Module name -> `LoRALinear` for every wrapped layer, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def saved_modules(model: nn.Module) -> dict[str, SavedModule]:
    """Module name -> `SavedModule` for every module in `modules_to_save`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SavedModule)}


def find_targets(model: nn.Module, target_modules: list[str] | str) -> list[str]:
    """Names of the modules to wrap; a clear error when none matches or one is not a linear layer."""
    modules = dict(model.named_modules())
    if target_modules == ALL_LINEAR:
        prefix, _ = decoder_layers(model)
        # The model's own layers: not those inside an earlier run's bottleneck adapters, kept frozen
        # under this LoRA when a run starts from that run (`tunelab.trained.load_start`).
        adapters = tuple(f"{n}." for n, m in modules.items() if isinstance(m, BottleneckAdapter))
        names = [
            n
            for n, m in modules.items()
            if isinstance(m, SUPPORTED_LAYERS)
            and layer_index(n, prefix) is not None
            and not any(n.startswith(adapter) for adapter in adapters)
        ]
    else:
        names = [n for n in modules if n and name_matches(n, target_modules)]
    if not names:
        raise TunelabError(
            f"lora: target_modules {target_modules!r} match no module of {type(model).__name__}; "
            f"{_linear_names_hint(modules)}"
        )
    unsupported = [
        f"{n} ({type(modules[n]).__name__})" for n in names if not isinstance(modules[n], SUPPORTED_LAYERS)
    ]
    if unsupported:
        raise TunelabError(
            f"lora: target_modules {target_modules!r} match layers LoRA cannot wrap: "
            f"{', '.join(unsupported[:5])}{' ...' if len(unsupported) > 5 else ''}; LoRA wraps nn.Linear and "
            f"Conv1D layers only. {_linear_names_hint(modules)}"
        )
    return names


def _linear_names_hint(modules: dict[str, nn.Module]) -> str:
    """`its Linear/Conv1D layers are named: a, b, c (e.g. model.layers.0.self_attn.q_proj)`."""
    linear = [n for n, m in modules.items() if isinstance(m, SUPPORTED_LAYERS)]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in linear})
    example = f" (e.g. {linear[0]})" if linear else ""
    return f"its Linear/Conv1D layers are named: {', '.join(leaves)}{example}"


def find_modules_to_save(model: nn.Module, names: list[str]) -> list[str]:
    """Names of the outermost modules matching `modules_to_save` (dotted suffixes)."""
    chosen: list[str] = []
    for pattern in names:
        matches = [n for n, _ in model.named_modules() if n and name_matches(n, [pattern])]
        if not matches:
            modules = [n for n, _ in model.named_modules() if n and n.count(".") <= 1]
            raise TunelabError(
                f"lora: modules_to_save entry {pattern!r} matches no module of {type(model).__name__}; "
                f"top-level modules are e.g.: {', '.join(modules[:12])}"
            )
        chosen += matches
    return [n for n in dict.fromkeys(chosen) if not any(n.startswith(other + ".") for other in chosen)]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def apply(model: nn.Module, options: Options) -> None:
    """Freeze the model, wrap every target in a `LoRALinear` and every `modules_to_save` entry in a
    `SavedModule`. Afterwards only A, B and the saved modules' copies require gradients."""
    if lora_layers(model) or saved_modules(model):
        raise TunelabError("lora: the model already holds LoRA layers; apply LoRA once")
    targets = find_targets(model, options.target_modules)
    to_save = find_modules_to_save(model, options.modules_to_save)
    overlap = [t for t in targets if any(t == s or t.startswith(s + ".") for s in to_save)]
    if overlap:
        raise TunelabError(
            f"lora: {overlap[0]!r} is both a LoRA target and inside modules_to_save; choose one"
        )
    freeze_all(model)
    for name in targets:
        layer = LoRALinear(
            model.get_submodule(name),
            r=options.r,
            alpha=options.alpha,
            dropout=options.dropout,
            use_rslora=options.use_rslora,
            init=options.init,
            use_dora=options.use_dora,
        )
        _replace(model, name, layer)
    for name in to_save:
        _replace(model, name, SavedModule(model.get_submodule(name)))


def _require_lora(model: nn.Module, what: str) -> None:
    """`RuntimeError` (a programming error) when the model holds no LoRA layer or saved module."""
    if not lora_layers(model) and not saved_modules(model):
        raise RuntimeError(f"lora: cannot {what}: the model holds no LoRA layers (apply or load LoRA first)")


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes its base model's outputs (merged layers are unmerged
    meanwhile, and the originals of `modules_to_save` are used); yields the model. The previous
    state comes back after, so nesting is harmless. `RuntimeError` without LoRA layers."""
    _require_lora(model, "disable the adapter")
    layers = list(lora_layers(model).values()) + list(saved_modules(model).values())
    before = [(m, m.enabled, getattr(m, "merged", False)) for m in layers]
    try:
        for m in layers:
            if isinstance(m, LoRALinear):
                m.unmerge()
            m.enabled = False
        yield model
    finally:
        for m, enabled, merged in before:
            m.enabled = enabled
            if merged:
                m.merge()


def merge(model: nn.Module) -> None:
    """Fold every update into its base weight, W <- W + s B A (DoRA: W <- m (W + s B A) / n).
    Idempotent. A `TunelabError` on a quantised base (see `tunelab.methods.lora_layer`)."""
    _require_lora(model, "merge")
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge(model: nn.Module) -> None:
    """Undo `merge`: W <- W - s B A (exact up to rounding). Does nothing for unmerged layers."""
    _require_lora(model, "unmerge")
    for layer in lora_layers(model).values():
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge, then replace every wrapper by a plain layer: `LoRALinear` by its (merged) base layer,
    `SavedModule` by its trained copy. Returns the model, now a plain Hugging Face model."""
    merge(model)
    for name, layer in lora_layers(model).items():
        _replace(model, name, layer.base_layer)
    for name, saved in saved_modules(model).items():
        _replace(model, name, saved.trained_module)
    return model


def _task_type(model: nn.Module) -> str:
    return "SEQ_CLS" if type(model).__name__.endswith("ForSequenceClassification") else "CAUSAL_LM"


def save(model: nn.Module, options: Options, out_dir: Path, base_model: str) -> None:
    """Write the adapter alone in PEFT's format (`adapter_config.json`, `adapter_model.safetensors`).

    `all-linear` is recorded as the list of wrapped module names, as PEFT itself records it.
    """
    _require_lora(model, "save")
    layers = lora_layers(model)
    targets = options.target_modules
    if targets == ALL_LINEAR:
        targets = list(layers)
    alpha = int(options.alpha) if float(options.alpha).is_integer() else options.alpha
    config = peft_config(
        r=options.r,
        alpha=alpha,
        dropout=options.dropout,
        target_modules=targets,
        use_rslora=options.use_rslora,
        modules_to_save=list(options.modules_to_save),
        init=options.init,
        base_model=str(base_model),
        fan_in_fan_out=any(layer.fan_in_fan_out for layer in layers.values()),
        task_type=_task_type(model),
        use_dora=options.use_dora,
    )
    write_adapter_folder(Path(out_dir), config, adapter_tensors(model))


def options_from_peft_config(config: dict, adapter_dir: Path) -> Options:
    """Our `Options` from the PEFT `adapter_config.json` of `adapter_dir` (its fields' types already
    checked by `lora_io.read_adapter`); a bad value is a `TunelabError` naming the file."""
    modules_to_save = config.get("modules_to_save") or []
    values = {
        "r": config["r"],
        "alpha": config["lora_alpha"],
        "dropout": config.get("lora_dropout") or 0.0,
        "target_modules": config["target_modules"],
        "use_rslora": bool(config.get("use_rslora", False)),
        "modules_to_save": [modules_to_save] if isinstance(modules_to_save, str) else list(modules_to_save),
        "init": "gaussian" if config.get("init_lora_weights") == "gaussian" else "kaiming",
        "use_dora": bool(config.get("use_dora", False)),
    }
    return options_from_config(Options, values, adapter_dir)


def load(model: nn.Module, adapter_dir: Path, trainable: bool = False) -> None:
    """Apply the LoRA adapter saved in `adapter_dir` (by tunelab or PEFT) to `model`, in place.

    The whole model is frozen afterwards unless `trainable`, which leaves A, B and the
    `modules_to_save` copies trainable (as `apply` does) so that the adapter can be trained further.
    """
    adapter_dir = Path(adapter_dir)
    config, tensors = read_adapter(adapter_dir)
    apply(model, options_from_peft_config(config, adapter_dir))
    load_into(adapter_tensors(model), tensors, str(adapter_dir / WEIGHTS_FILE))
    if not trainable:
        freeze_all(model)

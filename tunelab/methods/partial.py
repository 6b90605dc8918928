"""Partial fine-tuning: only chosen layers and modules train; the rest stays frozen.

A parameter theta_i trains iff it lies in a chosen decoder layer (`last_layers: N` or
`layers: [i, ...]`) or in a module named in `modules` (by dotted-suffix, e.g. `lm_head`,
`norm`, or by a regular expression with `modules_regex`). Frozen parameters get no gradient and
no optimizer state. The final artifact is the whole model in Hugging Face format; like full
fine-tuning, the method cannot be disabled and has no adapter to load (`save`, `load`, `disabled` and
`DISABLES_TO_BASE` are full fine-tuning's, see `tunelab.methods.full`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PreTrainedModel

from tunelab.errors import TunelabError
from tunelab.methods.full import DISABLES_TO_BASE, disabled, load, save
from tunelab.methods.inject import decoder_layers, layer_index, name_matches, select_layers

__all__ = ["Options", "apply", "save", "load", "disabled", "DISABLES_TO_BASE"]


@dataclass
class Options:
    last_layers: int | None = None
    """Train the last N decoder layers."""
    layers: list[int] | None = None
    """Train these decoder layers (indices; negative counts from the end)."""
    modules: list[str] = field(default_factory=list)
    """Also train these modules, matched by dotted-name suffix (e.g. `lm_head`, `model.norm`)."""
    modules_regex: str | None = None
    """Also train modules whose full dotted name matches this regular expression."""


def apply(model: PreTrainedModel, options: Options) -> None:
    """Freeze everything, then unfreeze the chosen layers and modules."""
    if (
        options.last_layers is None
        and options.layers is None
        and not options.modules
        and not options.modules_regex
    ):
        raise TunelabError(
            "method 'partial' needs at least one of last_layers, layers, modules, modules_regex"
        )
    prefix, blocks = decoder_layers(model)
    chosen = (
        select_layers(len(blocks), options.layers, options.last_layers)
        if options.last_layers is not None or options.layers is not None
        else set()
    )
    module_names = [name for name, _ in model.named_modules()]
    for patterns in ([options.modules] if options.modules else []) + (
        [options.modules_regex] if options.modules_regex else []
    ):
        if not any(name_matches(n, patterns) for n in module_names):
            raise TunelabError(
                f"partial: {patterns!r} matches no module of {type(model).__name__}; modules are e.g. "
                + ", ".join(n for n in module_names if n and layer_index(n, prefix) in (None, 0))[:600]
            )
    for name, p in model.named_parameters():
        module_name = name.rsplit(".", 1)[0]
        in_layer = layer_index(name, prefix) in chosen
        in_module = (options.modules and name_matches(module_name, options.modules)) or (
            options.modules_regex and name_matches(module_name, options.modules_regex)
        )
        p.requires_grad_(bool(in_layer or in_module))

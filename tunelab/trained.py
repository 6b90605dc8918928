"""Trained runs, loaded again: for inference, and as the starting point of a further run.

A run folder means its `final/`. A folder with `adapter_config.json` is an adapter (tunelab's or
PEFT's): its base model is loaded from `base_model_name_or_path` and the adapter's method re-applied
(`Method.load` of `tunelab.methods`). Any other folder is a Hugging Face model (full or partial
fine-tuning). The base an adapter names may itself be an earlier run (SFT -> DPO -> PPO): it is
loaded the same way, recursively, so a chain of runs loads from its last folder.

A run that starts from an earlier adapter run (`model.name_or_path` naming it) starts from the
policy that run trained, pi_start = base + earlier adapter:

- `model.earlier_adapter: merge` (default): a LoRA adapter is folded into the weights in memory,
  W' = W + s B A, exactly the same function with no extra layer; an adapter that cannot fold (a
  bottleneck adapter, a prefix) stays applied and frozen. The new method then applies on top, and
  its `disabled` context computes pi_start, so that is the reference policy of DPO/PPO/GRPO.
- `model.earlier_adapter: continue`: the earlier adapter itself trains further (the configured
  method must be the earlier one; its options are the saved ones). The reference is then a frozen
  copy of pi_start (disabling the adapter would give the bare base instead).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from tunelab.errors import ConfigError, TunelabError
from tunelab.methods import get_method
from tunelab.methods.adapter_files import (
    config_error,
    config_field,
    is_adapter_folder,
    options_from_config,
    read_adapter_config,
)
from tunelab.models import load_model, load_tokenizer

ADAPTER_METHODS = ("lora", "adapter", "prefix")  # the methods whose artifact is an adapter folder
MERGEABLE = ("lora",)  # adapters whose update is a weight delta, folded into W when a run starts on them


def adapter_method_of(adapter_dir: Path) -> str:
    """Which method saved the adapter in `adapter_dir` (from its `adapter_config.json`)."""
    config = read_adapter_config(adapter_dir)
    if "tunelab_method" in config:
        method = config["tunelab_method"]
        if method not in ADAPTER_METHODS:
            raise config_error(
                adapter_dir,
                "tunelab_method",
                f"unknown adapter method {method!r}; tunelab saves {ADAPTER_METHODS}",
            )
        return method
    peft_type = config.get("peft_type")
    by_peft_type = {"LORA": "lora", "PREFIX_TUNING": "prefix"}
    if peft_type not in by_peft_type:
        raise TunelabError(f"{adapter_dir}: adapter type {peft_type!r} is not supported by tunelab")
    return by_peft_type[peft_type]


def adapter_options(adapter_dir: Path, method: str):
    """The method `Options` an adapter folder was saved with (to train it further under them)."""
    from tunelab.methods import adapter, lora, prefix

    config = read_adapter_config(adapter_dir)
    if method == "lora":
        return lora.options_from_peft_config(config, adapter_dir)
    options_cls = {"adapter": adapter.Options, "prefix": prefix.Options}[method]
    values = {f.name: config[f.name] for f in fields(options_cls) if f.name in config}
    return options_from_config(options_cls, values, adapter_dir)


def resolve_model_dir(path: str | Path) -> Path:
    """A run folder means its `final/`; a model or adapter folder means itself."""
    path = Path(path)
    if (path / "final").is_dir() and not (path / "config.json").exists():
        return path / "final"
    return path


def is_earlier_run(name_or_path: str) -> bool:
    """Does `name_or_path` name a tunelab run folder or an adapter folder (rather than a base model)?"""
    model_dir = resolve_model_dir(name_or_path)
    return model_dir != Path(name_or_path) or is_adapter_folder(model_dir)


def adapter_base(adapter_dir: Path, base_model: str | None = None) -> str:
    """The base model an adapter folder names (`base_model_name_or_path`), unless overridden."""
    config = read_adapter_config(adapter_dir)
    base = base_model or config_field(config, adapter_dir, "base_model_name_or_path", "str", required=False)
    if not base:
        raise TunelabError(f"{adapter_dir}/adapter_config.json names no base model; pass one")
    return base


def root_model(name_or_path: str) -> str:
    """The model folder or hub id at the bottom of a chain of runs (what its config.json describes)."""
    model_dir = resolve_model_dir(name_or_path)
    if model_dir.is_dir() and is_adapter_folder(model_dir):
        return root_model(adapter_base(model_dir))
    return str(model_dir) if model_dir.is_dir() else name_or_path


def tokenizer_source(name_or_path: str) -> str:
    """Where the tokenizer of a model, run or adapter lives: the folder itself when it holds one,
    else (an adapter saved without it) its base's, recursively."""
    model_dir = resolve_model_dir(name_or_path)
    if (
        model_dir.is_dir()
        and is_adapter_folder(model_dir)
        and not (model_dir / "tokenizer_config.json").exists()
    ):
        return tokenizer_source(adapter_base(model_dir))
    return str(model_dir) if model_dir.is_dir() else name_or_path


def start_tokenizer(config):
    """The tokenizer of a run's `config.model`, wherever it lives (`tokenizer_source`)."""
    return load_tokenizer(tokenizer_source(config.model.name_or_path), config.model.trust_remote_code)


@dataclass
class StartingPoint:
    """What a run's model is before training: the base and the earlier adapters on it."""

    base: str
    """The model whose weights were loaded (hub id or folder)."""
    earlier: list[str] = field(default_factory=list)
    """One line per earlier adapter, oldest first: `lora runs/sft/final (merged)`."""
    kept: list[str] = field(default_factory=list)
    """Methods of the earlier adapters that stay applied and frozen (could not merge)."""
    continued: str | None = None
    """The earlier adapter's method when that adapter itself trains further."""

    def describe(self) -> str:
        return " + ".join([self.base, *self.earlier])


def load_start(
    name_or_path: str,
    dtype: str = "float32",
    device: str | torch.device = "auto",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    continue_adapter: bool = False,
    quantization=None,
) -> tuple[torch.nn.Module, StartingPoint]:
    """The policy a run starts from, pi_start: a base model, or an earlier run with its adapters
    merged or kept frozen (the module docstring), or with its last adapter trainable when
    `continue_adapter`. `quantization` (`model.quantization`) applies to the base model at the
    bottom of the chain. Returns (model, where it came from)."""
    model_dir = resolve_model_dir(name_or_path)
    if not (model_dir.is_dir() and is_adapter_folder(model_dir)):
        if model_dir.is_dir() and not (model_dir / "config.json").is_file():
            raise TunelabError(
                f"{model_dir} is neither a model folder (config.json) nor an adapter folder (adapter_config.json)"
            )
        source = str(model_dir) if model_dir != Path(name_or_path) else name_or_path
        model = load_model(
            source,
            dtype=dtype,
            device=device,
            trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
            quantization=quantization,
        )
        return model, StartingPoint(base=source)
    method = adapter_method_of(model_dir)
    base = adapter_base(model_dir)
    model, start = load_start(
        base, dtype, device, trust_remote_code, attn_implementation, quantization=quantization
    )
    get_method(method).load(model, model_dir, trainable=continue_adapter)
    if continue_adapter:
        start.earlier.append(f"{method} {model_dir} (trained further)")
        start.continued = method
    elif method in MERGEABLE and quantization is not None and quantization.bits is not None:
        raise ConfigError(
            f"{model_dir}: an earlier {method} adapter cannot be folded into a {quantization.bits}-bit base "
            "exactly; train it further (model.earlier_adapter=continue), or merge that run first "
            "(tunelab merge) and start from the merged folder"
        )
    elif method in MERGEABLE:
        model = get_method(method).merge_and_unload(model)
        start.earlier.append(f"{method} {model_dir} (merged)")
    else:
        start.earlier.append(f"{method} {model_dir} (kept, frozen)")
        start.kept.append(method)
    return model, start


def start_model(
    config, device: torch.device, skeleton: torch.nn.Module | None = None
) -> tuple[torch.nn.Module, StartingPoint]:
    """Load `config.model` and apply `config.method`: the model a run trains, and where it started.

    From a base model or a merged earlier run the method applies fresh; with `earlier_adapter:
    continue` the earlier adapter is the method (its saved options replace `method.options`).
    `skeleton`: the base model built without its weights (sharded loading under FSDP,
    `tunelab.training.sharded_load`), used in place of loading it.
    """
    continuing = config.model.earlier_adapter == "continue"
    if continuing and not is_earlier_run(config.model.name_or_path):
        raise ConfigError(
            f"model.earlier_adapter=continue, but model.name_or_path={config.model.name_or_path!r} is not "
            "an earlier run or adapter folder"
        )
    if skeleton is not None:
        method = get_method(config.method.name)
        method.apply(skeleton, config.method.options)
        return skeleton, StartingPoint(base=config.model.name_or_path)
    model, start = load_start(
        config.model.name_or_path,
        dtype=config.model.dtype,
        device=device,
        trust_remote_code=config.model.trust_remote_code,
        attn_implementation=config.model.attn_implementation,
        continue_adapter=continuing,
        quantization=config.model.quantization,
    )
    method = get_method(config.method.name)
    if continuing:
        if start.continued != config.method.name:
            raise ConfigError(
                f"model.earlier_adapter=continue trains the earlier {start.continued} adapter further, but "
                f"method.name={config.method.name!r}; set method.name={start.continued}"
            )
        config.method.options = adapter_options(resolve_model_dir(config.model.name_or_path), start.continued)
        return model, start
    if config.method.name in start.kept:
        raise ConfigError(
            f"{config.model.name_or_path} ends in a {config.method.name} adapter that cannot be merged, and "
            f"method.name={config.method.name} would add a second one on top: train it further with "
            "model.earlier_adapter=continue, or choose another method"
        )
    method.apply(model, config.method.options)
    return model, start


def load_trained(
    path: str | Path,
    dtype: str = "float32",
    device: str | torch.device = "auto",
    base_model: str | None = None,
    trust_remote_code: bool = False,
):
    """Load a trained run, model folder or adapter folder for inference: (model, tokenizer, method).

    An adapter folder (`adapter_config.json`) is applied, frozen and unmerged, to its base model,
    read from `base_model_name_or_path` unless `base_model` overrides it (a base that is itself an
    earlier run loads through `load_start`). The tokenizer comes from the folder when it holds one,
    else from the base model.
    """
    model_dir = resolve_model_dir(path)
    if not model_dir.exists():
        raise TunelabError(f"model path {str(path)!r} does not exist")
    if is_adapter_folder(model_dir):
        base = adapter_base(model_dir, base_model)
        method = adapter_method_of(model_dir)
        model, _ = load_start(base, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        get_method(method).load(model, model_dir, trainable=False)
        has_tokenizer = (model_dir / "tokenizer_config.json").exists()
        tokenizer = load_tokenizer(
            str(model_dir) if has_tokenizer else tokenizer_source(base), trust_remote_code
        )
    else:
        model, _ = load_start(str(model_dir), dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        tokenizer = load_tokenizer(str(model_dir), trust_remote_code)
        method = "full"
    model.eval()
    return model, tokenizer, method

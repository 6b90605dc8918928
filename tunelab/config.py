"""Typed run configuration: YAML -> dataclasses, with strict checks and dotted overrides.

    tunelab train run.yaml train.lr=1e-4 method.r=16

Every field has a type and an attribute docstring (the text under it). Loading checks every key:
an unknown key, a value of the wrong type or a bad value is a `ConfigError` that names the key and
the file. The `method:` and `objective:` sections name a method/objective and carry that module's
own `Options` fields, so each method keeps its options beside its code.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tunelab.config_text import apply_overrides, parse_override, read_yaml, yaml_problem  # noqa: F401 (re-exported)
from tunelab.defaults import resolve_defaults
from tunelab.errors import ConfigError


@dataclass
class QuantizationConfig:
    bits: Literal[4, 8] | None = None
    """Quantise the frozen base to 4 or 8 bits with bitsandbytes (QLoRA); null keeps full precision.
    Embeddings and the LM head stay unquantised. Only lora, adapter and prefix train on a quantised base."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type: `nf4` (NormalFloat, QLoRA's choice for normally distributed weights) or `fp4`."""
    double_quant: bool = False
    """4 bits: quantise the per-block scales too (about 0.4 bits per weight less)."""
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """4 bits: dtype the weights are dequantised to for each matmul (`bfloat16` on a GPU that has it)."""


@dataclass
class ModelConfig:
    name_or_path: str = ""
    """Hugging Face hub id (e.g. `Qwen/Qwen2.5-0.5B`) or local model folder; or an earlier tunelab run
    (its folder, its `final/`, or any adapter folder), which the run then starts from (`earlier_adapter`)."""
    earlier_adapter: Literal["merge", "continue"] = "merge"
    """When `name_or_path` is an earlier adapter run: `merge` folds a LoRA adapter into the weights in
    memory (other adapters stay applied, frozen) and the method applies on top, so the reference policy
    is the earlier run's model; `continue` trains the earlier adapter itself further (same method)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Dtype the weights are loaded in. Trainable parameters are kept in float32 when `train.precision`
    is `bf16`/`fp16` autocast; see `train.precision`. `auto`: bfloat16 for a frozen base (lora, adapter,
    prefix, partial) where the device computes bf16 natively (CUDA with bf16, a CPU with AVX-512 BF16 or
    AMX), else float32; float32 for `full` (see tunelab/defaults.py)."""
    device: str = "auto"
    """`auto` (CUDA when available, else CPU), `cpu`, `cuda`, `cuda:1`, ..."""
    trust_remote_code: bool = False
    """Run code shipped with a hub model. Off unless you trust its author."""
    attn_implementation: str | None = None
    """Override the attention kernel (`eager`, `sdpa`, `flash_attention_2`); default: transformers' choice."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    checkpoint_every: int = 1
    """With `gradient_checkpointing`, checkpoint every N-th decoder layer only (layers 0, N, 2N, ...);
    the others keep their activations. 1 checkpoints all of them; 2 about half: half the memory
    saving for half the recomputation (`tunelab inspect` shows the plan)."""
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    """Load the frozen base quantised (bitsandbytes): `bits`, `quant_type`, `double_quant`, `compute_dtype`."""


@dataclass
class MethodConfig:
    name: Literal["full", "partial", "lora", "adapter", "prefix"] = "full"
    """Fine-tuning method: which parameters train and how the model is transformed."""
    options: Any = None
    """The method's own options (the other keys of the `method:` section); see tunelab/methods/<name>.py."""


@dataclass
class ObjectiveConfig:
    name: Literal["sft", "reward", "dpo", "kto", "ppo", "grpo"] = "sft"
    """Training objective (the training loop): supervised fine-tuning, reward model, DPO (and IPO,
    SimPO, ORPO), KTO, PPO, GRPO."""
    options: Any = None
    """The objective's own options (the other keys of the `objective:` section)."""


@dataclass
class SourceConfig:
    """One source of a data mixture (an item of the list `data.train` or `data.eval`)."""

    path: str = ""
    """A local .jsonl/.json/.csv/.parquet file, a glob of them (`data/*.jsonl`), a local folder that
    `datasets.load_dataset` reads (a hub-style data set), or a hub data set id (`openai/gsm8k`)."""
    subset: str | None = None
    """The hub data set's subset (its configuration name, e.g. `main` for gsm8k)."""
    split: str | None = None
    """The split to read (unset: `data.split` for training sources, the eval split for eval sources)."""
    revision: str | None = None
    """The hub data set's revision (a branch, tag or commit); pin it for reproducible runs."""
    data_files: list[str] | None = None
    """Files of the hub data set (or local folder) to read, as `datasets.load_dataset(data_files=...)`."""
    format: (
        Literal["auto", "instruction", "chat", "prompt_completion", "text", "preference", "prompt"] | None
    ) = None
    """This source's record format (unset: `data.format`)."""
    columns: dict[str, str] | None = None
    """Rename columns before reading the records: `{question: instruction, answer: output}`. A record
    lacking a mapped column is a bad record."""
    weight: float | None = None
    """Take round(weight x records of the source) records: 2 repeats every record twice, 0.5 takes a
    seeded half. Unset (and no `records`): every record once."""
    records: int | None = None
    """Take exactly this many records (a seeded sample; repeats when above the source's size)."""
    streaming: bool = False
    """Stream a hub data set instead of downloading it whole: records come through a seeded shuffle
    buffer (`shuffle_buffer`); with `records` only that many are read."""
    shuffle_buffer: int = 10000
    """Records in the shuffle buffer of a streamed source."""

    def __post_init__(self):
        if not self.path:
            raise ValueError("path: must name a file, a glob, a folder or a hub data set")
        if self.weight is not None and self.records is not None:
            raise ValueError("give weight or records, not both")
        if self.weight is not None and not self.weight > 0:
            raise ValueError(f"weight: must be positive, got {self.weight}")
        if self.records is not None and self.records < 1:
            raise ValueError(f"records: must be at least 1, got {self.records}")
        if self.shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer: must be at least 1, got {self.shuffle_buffer}")


@dataclass
class DataConfig:
    train: str | list[SourceConfig] = ""
    """Training data: a local .jsonl/.json/.csv/.parquet file, or a hub data set id (`tatsu-lab/alpaca`);
    or a list of sources (see `SourceConfig`), mixed by their `weight` / `records`."""
    eval: str | list[SourceConfig] | None = None
    """Held-out data (same forms as `train`). If unset, `eval_fraction` of the training records is held out."""
    eval_fraction: float = 0.0
    """Fraction of training records held out for evaluation when `eval` is unset (0 disables)."""
    split: str = "train"
    """Split to read from a hub data set."""
    eval_split: str | None = None
    """Split of a hub data set used for evaluation when `eval` names the same hub id."""
    format: Literal["auto", "instruction", "chat", "prompt_completion", "text", "preference", "prompt"] = (
        "auto"
    )
    """Record format. `auto` detects it from the first record's fields."""
    template: Literal["auto", "alpaca", "chat", "plain"] = "auto"
    """How prompts are rendered: `chat` uses the tokenizer's chat template, `alpaca` the
    `### Instruction / ### Input / ### Response` template, `plain` the prompt and response
    concatenated as they are; `auto` = chat if the tokenizer has a template, else alpaca."""
    max_length: int = 512
    """Maximum tokens per example; longer ones are truncated (counted and reported)."""
    train_on_prompt: bool = False
    """Also put loss on prompt tokens (default: loss on the response only)."""
    skip_bad_records: bool = False
    """Skip malformed records (reporting how many) instead of stopping with an error."""
    max_records: int | None = None
    """Use at most this many training records (handy for smoke runs)."""
    system_prompt: str | None = None
    """A system message put before every chat/instruction prompt."""
    packing: bool | Literal["auto"] = "auto"
    """Pack several examples into each row (padding-free), with attention that cannot cross examples.
    `auto`: on for SFT with every method but prefix (which pads, saying so); off for the objectives
    that pad (reward, dpo, kto, ppo, grpo)."""
    native_attention: bool | Literal["auto"] = "auto"
    """With packing on CPU, attend through tunelab's C++ kernel (float32, built at first use; SDPA
    where it cannot be built). False keeps PyTorch's SDPA, one call per example. `auto`: the kernel on
    a CPU with AVX-512 (its 16-lane vectors are one register there), SDPA elsewhere (on AVX2 the
    kernel measured 8x slower than SDPA)."""
    group_by_length: bool = False
    """Batch examples of similar length together (less padding); order stays seeded and resumable."""
    chat_template: str | None = None
    """A Jinja chat template (the text, or the path of a file holding it) used instead of the
    tokenizer's own, for training and generation alike."""
    cache_dir: str | None = "~/.cache/tunelab/tokens"
    """Folder of the token cache: tokenised data are kept there (memory-mapped), keyed by a hash of
    the sources' contents, the tokenizer, the template and every data option, and reused by the next
    run and by every rank. Unset (null): tokenise in memory on every run."""


@dataclass
class TrainConfig:
    max_steps: int | None = None
    """Optimizer steps to run. If unset, `epochs` decides."""
    epochs: float = 1.0
    """Passes over the training data when `max_steps` is unset."""
    batch_size: int = 8
    """Examples per micro-batch (per device)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step. The loss is normalised by the target tokens of all of them,
    so `batch_size=8, grad_accum=1` gives the same step as `batch_size=1, grad_accum=8`."""
    max_micro_batch_tokens: int | None = None
    """SFT: the most token slots one forward pass holds (per device). A micro-batch whose packed row
    (its examples' lengths summed) or padded rows (rows x the longest) would hold more is split into
    consecutive sub-batches, run one after the other in the same optimizer step; the loss is still
    normalised by the step's target tokens, so the step is the same (up to summation order) and only
    the activation memory is bounded. At least `data.max_length`; unset: no bound."""
    lr: float = 2e-4
    """Peak learning rate."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate schedule after warmup (cosine and linear decay to `min_lr_ratio * lr`)."""
    warmup_steps: int = 0
    """Linear warmup steps from 0 to `lr`."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of `lr` for cosine/linear schedules."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (never applied to biases, norms or other 1-D parameters)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this value (unset: no clipping)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Compute precision: `bf16`/`fp16` run the forward under autocast with float32 master weights.
    `auto`: `bf16` where the device computes bf16 natively, else `fp32` (`fp16` with a float16
    `model.dtype`); see tunelab/defaults.py."""
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    """Data parallelism when launched by `torchrun` with several processes (ignored otherwise):
    `ddp` replicates the model, `fsdp` shards parameters, gradients and optimizer state (FSDP2);
    `auto` is `ddp`. `batch_size` is per process: the global batch is batch_size x processes."""
    seed: int = 42
    """Seed for initialisation, data order, dropout and sampling."""
    log_every: int = 1
    """Write a metrics row (and update the progress bar) every N steps."""
    eval_every: int | None = None
    """Evaluate every N steps (and at the end) when eval data exists."""
    save_every: int | None = None
    """Write a checkpoint every N steps."""
    keep_last: int = 2
    """Keep the last K checkpoints."""
    resume: bool = False
    """Continue from the latest checkpoint in `output_dir/checkpoints/` at the exact next batch."""
    max_nonfinite_steps: int = 3
    """A step whose loss or gradient norm is not finite (NaN, inf) is not applied; after this many
    such steps in a row the run stops, naming the step and its examples (the last checkpoint is
    kept). With `precision: fp16` the loss scaler skips gradient overflows itself: only a loss that
    is not finite counts."""
    eval_batches: int | None = None
    """Evaluate on at most this many eval batches (unset: all)."""
    progress: bool = True
    """Show a progress bar."""
    chunked_loss: bool = True
    """Compute the LM head and cross-entropy only on target positions and in chunks (no full logits)."""
    loss_chunk_size: int = 1024
    """Target positions per chunk of the chunked loss."""
    compile: bool = False
    """Run the model through `torch.compile`."""
    fused_kernels: bool | Literal["auto"] = "auto"
    """On the CPU, run the RMSNorm and SwiGLU MLP of Llama-family blocks (Llama, Mistral, Qwen2/3,
    Phi-3's norms) as single C++ passes (`tunelab.kernels.cpu_fused`, built at first use): the same
    roundings as transformers' modules, float32 sums in another order. `auto`: on for a CPU run in
    bf16 precision without `compile`; float32 runs keep transformers' arithmetic to the last bit."""
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = field(default_factory=list)
    """Experiment trackers that receive every `metrics.jsonl` row (same step), the resolved config
    as the run's parameters and the `eval.sample_prompts` samples (tunelab/trackers.py). A missing
    package stops the run as it starts, naming what to install. TensorBoard events are written to
    `tensorboard/` whenever tensorboard is installed; listing it makes it required."""

    def __post_init__(self):
        from tunelab.trackers import check_installed  # a missing tracker fails before any data or model loads

        check_installed(self.report_to)


@dataclass
class EvalConfig:
    generate: bool = True
    """For instruction/chat data, greedily generate responses and report exact-match accuracy."""
    max_new_tokens: int = 64
    """Maximum tokens generated per response."""
    num_examples: int | None = 200
    """Generate for at most this many eval records (unset: all)."""
    batch_size: int = 32
    """Prompts generated together."""
    sample_prompts: list[str] = field(default_factory=list)
    """Prompts answered greedily (`max_new_tokens`) at every evaluation (`train.eval_every`) of an
    SFT run, rendered like `tunelab generate --prompt`; written to `samples.jsonl` (step, prompt,
    completion) and to the `train.report_to` trackers."""


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """Base model."""
    method: MethodConfig = field(default_factory=MethodConfig)
    """Fine-tuning method and its options."""
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """Training objective and its options."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and evaluation data."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation, logging and checkpointing."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation by generation."""
    output_dir: str = "runs/default"
    """Folder of the run: metrics.jsonl, checkpoints/step-N/, final/, loss.png."""
    default_notes: list[str] = field(
        default_factory=list, init=False, repr=False, metadata={"internal": True}
    )
    """The lines the run prints about the `auto` values the config resolved to (tunelab/defaults.py);
    not part of the config itself."""
    auto_keys: list[str] = field(default_factory=list, init=False, repr=False, metadata={"internal": True})
    """The keys that were `auto` before `resolve_defaults` (`data.packing`, ...): a recipe may still fall
    back from one of them (sft pads where the model cannot take packed attention)."""

    def to_dict(self) -> dict:
        """Plain nested dict (what `config.yaml` in the run folder holds)."""
        return to_plain(self)


# ---------------------------------------------------------------- parsing


_PLAIN_NAMES = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "true or false",
    type(None): "null",
}


def _type_name(tp: Any) -> str:
    """How an error names a type a value should have: 'an integer', 'null', 'list[str]'."""
    if tp in _PLAIN_NAMES:
        return _PLAIN_NAMES[tp]
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against type `tp`; return it (ints widen to float). Raise ValueError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(f"expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {value!r}")
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping, got {value!r}")
        return {_convert(k, args[0], key): _convert(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):  # an item of a list of sections (data.train's sources)
        return build_dataclass(tp, value, key, "")
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {value!r}")
        return value
    raise ValueError(f"unsupported config type {tp!r}")


def build_dataclass(cls: type, data: Any, key: str, source: str) -> Any:
    """Build dataclass `cls` from mapping `data`, strictly. `key` is the dotted path for messages."""
    where = f"in {source}" if source else ""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{key or 'config'}: expected a mapping, got {data!r} {where}".strip())
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in data if k not in names]
    if unknown:
        full = f"{key}.{unknown[0]}" if key else unknown[0]
        raise ConfigError(f"unknown key {full!r} {where}; valid keys here: {', '.join(names)}".strip())
    kwargs = {}
    for name, value in data.items():
        full = f"{key}.{name}" if key else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build_dataclass(tp, value, full, source)
            continue
        try:
            kwargs[name] = _convert(value, tp, full)
        except ValueError as err:
            raise ConfigError(f"{full}: {err} {where}".strip()) from None
        except ConfigError as err:  # from a section inside a list, which does not know the file
            raise ConfigError(f"{err} {where}".strip()) from None
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{key or 'config'}: {err} {where}".strip()) from None


def _build_named_section(section: dict, key: str, source: str, modules: dict, default: str):
    """`method:` / `objective:`: a `name` plus that module's `Options` fields."""
    import importlib

    where = f"in {source}" if source else ""
    section = dict(section or {})
    name = section.pop("name", default)
    if name not in modules:
        raise ConfigError(f"{key}.name: must be one of {sorted(modules)}, got {name!r} {where}".strip())
    options_cls = importlib.import_module(modules[name]).Options
    return name, build_dataclass(options_cls, section, key, source)


def build_config(data: dict, source: str = "") -> RunConfig:
    """A `RunConfig` from a nested dict (as read from YAML)."""
    from tunelab.methods import METHOD_MODULES
    from tunelab.objectives import OBJECTIVE_MODULES

    where = f"in {source}" if source else ""
    if not isinstance(data, dict):
        raise ConfigError(f"the config must be a mapping of sections {where}".strip())
    data = dict(data)
    method = data.pop("method", None) or {}
    objective = data.pop("objective", None) or {}
    if not isinstance(method, dict) or not isinstance(objective, dict):
        raise ConfigError(f"'method' and 'objective' must be mappings {where}".strip())
    config = build_dataclass(RunConfig, data, "", source)
    config.method = MethodConfig(*_build_named_section(method, "method", source, METHOD_MODULES, "full"))
    config.objective = ObjectiveConfig(
        *_build_named_section(objective, "objective", source, OBJECTIVE_MODULES, "sft")
    )
    _check_run(config, source)
    resolve_defaults(config)
    return config


def _check_run(config: RunConfig, source: str) -> None:
    where = f"in {source}" if source else ""
    checks = [
        (config.model.name_or_path != "", "model.name_or_path", "must name a hub id or a local folder"),
        (config.train.batch_size >= 1, "train.batch_size", "must be at least 1"),
        (config.train.grad_accum >= 1, "train.grad_accum", "must be at least 1"),
        (config.train.lr > 0, "train.lr", "must be positive"),
        (config.train.max_steps is None or config.train.max_steps >= 1, "train.max_steps", "must be >= 1"),
        (config.train.epochs > 0, "train.epochs", "must be positive"),
        (config.train.warmup_steps >= 0, "train.warmup_steps", "must be >= 0"),
        (0 <= config.data.eval_fraction < 1, "data.eval_fraction", "must be in [0, 1)"),
        (config.data.max_length >= 8, "data.max_length", "must be at least 8"),
        (config.train.keep_last >= 1, "train.keep_last", "must be at least 1"),
        (config.model.checkpoint_every >= 1, "model.checkpoint_every", "must be at least 1"),
        (config.train.max_nonfinite_steps >= 0, "train.max_nonfinite_steps", "must be at least 0"),
        (len(config.train.betas) == 2, "train.betas", "must hold two numbers"),
        (
            config.train.max_micro_batch_tokens is None
            or config.train.max_micro_batch_tokens >= config.data.max_length,
            "train.max_micro_batch_tokens",
            f"must be at least data.max_length ({config.data.max_length}): one example must fit",
        ),
        (
            config.train.max_micro_batch_tokens is None or config.objective.name == "sft",
            "train.max_micro_batch_tokens",
            f"applies to objective sft only, not {config.objective.name}; unset it",
        ),
    ]
    for ok, key, problem in checks:
        if not ok:
            raise ConfigError(f"{key}: {problem} {where}".strip())
    if config.model.quantization.bits is not None and config.method.name in ("full", "partial"):
        problem = (
            f"cannot train method.name: {config.method.name} (its base weights train, and quantised "
            "weights cannot); use lora, adapter or prefix, or set model.quantization.bits: null"
        )
        raise ConfigError(f"model.quantization.bits: {problem} {where}".strip())
    if config.data.packing is True and config.method.name == "prefix" and config.objective.name == "sft":
        problem = (
            "cannot be used with method.name: prefix (prefix tuning's prefix is a key/value cache "
            "before the tokens, which packed attention cannot take); turn data.packing off"
        )
        raise ConfigError(f"data.packing: {problem} {where}".strip())


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, **sections) -> RunConfig:
    """Load a YAML config, apply `key.sub=value` overrides, and check everything.

    With no path, `sections` give the nested dict directly (handy from Python:
    `load_config(model={"name_or_path": ...}, data={...})`).
    """
    data = read_yaml(path) if path is not None else {}
    data.update(copy.deepcopy(sections))  # overrides set keys in place: the caller's dicts stay as given
    data = apply_overrides(data, list(overrides or []))
    source = str(path) if path is not None else ("command-line overrides" if overrides else "")
    return build_config(data, source)


def to_plain(obj: Any) -> Any:
    """Dataclasses -> dicts, recursively; method/objective sections flattened back to `name` + options."""
    if isinstance(obj, (MethodConfig, ObjectiveConfig)):
        return {"name": obj.name, **to_plain(obj.options)}
    if dataclasses.is_dataclass(obj):
        fields = [f for f in dataclasses.fields(obj) if not f.metadata.get("internal")]
        return {f.name: to_plain(getattr(obj, f.name)) for f in fields}
    if isinstance(obj, list):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the attribute docstring written under it (read from the source of `cls` and of
    the dataclasses it extends, e.g. the sampling options PPO and GRPO share)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, after in zip(body, body[1:], strict=False):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
                    docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs

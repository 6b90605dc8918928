"""The fast path by default: `model.dtype`, `train.precision`, `data.packing`, `data.native_attention`,
`train.fused_kernels`: `auto`.

A config that names only the model, the method and the data trains the way tunelab is fastest on
the machine it runs on. The `auto` values are resolved once, when the config is loaded
(`tunelab.config.build_config`), so that everything after (the run's `config.yaml`, the memory
planner, the model card) sees concrete values; an explicit value always wins.

Precision and dtype. "bf16 native" means the device computes bfloat16 in hardware (`bf16_native`):
a CUDA device that reports it (Ampere and later), a CPU with AVX-512 BF16 or AMX. Then

    precision auto -> bf16   (forward under bfloat16 autocast)
    dtype auto     -> bfloat16 for a frozen base (lora, adapter, prefix, partial's frozen layers)
                      float32 for `full` (its weights train: float32 master weights under autocast)

and everywhere else float32 + fp32. `prepare_model` keeps every trainable parameter in float32
whenever the precision is not fp32 (partial's trained layers, LoRA's `modules_to_save`, a reward
head): master weights, updated in float32, computed in bf16. A CUDA device without bf16 (V100,
T4) gets float32 + fp32 rather than fp16: fp16's range (65504) overflows in models pretrained in
bf16, and a default must not diverge where the explicit setting would; `train.precision: fp16`
(with the loss scaler) is one line away. A quantised base (`model.quantization.bits`) keeps its
rules: its matmuls compute in `model.quantization.compute_dtype`, the rest stays float32 + fp32.

When only one of the two is `auto`, it follows the explicit one:

    precision fp32            -> dtype float32 (a half base would compute in half precision)
    precision bf16 / fp16     -> dtype bfloat16 / float16 for a frozen base, float32 for `full`
    dtype float16             -> precision fp16 (the float16 base and fp16 autocast path)
    dtype bfloat16 / float32  -> precision bf16 where native, else fp32

Fused kernels. `train.fused_kernels: auto` is on for a CPU run in bf16 or fp32 precision (not
compiled; not fp16, which the kernels do not take): RMSNorm and the SwiGLU MLP as single C++ passes
(`tunelab.kernels.cpu_fused`), with the bf16 roundings of transformers' modules, and the LM head's
cross-entropy rows. With them a training pass keeps neither the norms' nor SwiGLU's outputs for
backward: both are rebuilt, bit for bit, from what their own nodes keep
(`tunelab.training.saved_tensors`). In float32 (a CPU without native bf16: a Zen 3 EPYC with AVX2)
whole jobs on the 31.6M benchmark workload, one after the other: LoRA 140 s at 1,121 MB against
141 s at 1,202 MB (medians of three), full fine-tuning 239 s at 1,242 MB against 251 s at 1,517 MB,
the same eval loss (3.7097). Float32 sums then run in another order than transformers' chain, so
values differ from it in the last bits (tests/unit/test_cpu_fused.py); `false` keeps the chain.

Packed attention on CPU. `data.native_attention: auto` takes tunelab's C++ kernel
(`tunelab.kernels.cpu_attention`) on a CPU with AVX-512 (`wide_vectors`): its arithmetic runs on
vectors of 16 float32 lanes, one register there. AVX2 has 16 registers of 8 lanes, each vector
takes two, and the same code compiled for it keeps its accumulators on the stack: on a Zen 3 EPYC,
one layer's attention over a packed row of 1,464 tokens took 89 ms forward and 187 ms backward
against 11 and 23 ms for SDPA per example. So `auto` is the kernel with AVX-512 and SDPA per
example elsewhere (other instruction sets and other devices; on CUDA the option has no effect).
Both compute the same attention in float32.

Packing. `data.packing: auto` is on for SFT with every method but prefix (packed rows give every
example the logits of the padded batch, `tunelab.data.packing`; only the cost changes). Prefix
tuning's prefix is a key/value cache before the tokens, which packed attention cannot take: the
run pads and says so in one line. The objectives that pad (reward, dpo, kto, ppo, grpo) resolve
`auto` to off silently; an explicit `true` keeps their "ignored" line.
"""

from __future__ import annotations

from typing import Any

RunConfig = Any
"""`tunelab.config.RunConfig`, not imported: the config module imports this one."""

AUTO = "auto"
FROZEN_BASE_METHODS = ("partial", "lora", "adapter", "prefix")
"""Methods whose base weights (all of them, or partial's earlier layers) stay frozen."""


def device_type(device: str) -> str:
    """The device type `model.device` names (`auto`: cuda when present, else cpu); a name torch does
    not read is returned as it is (`tunelab.models.resolve_device` refuses it when the model loads)."""
    import torch

    if device == AUTO:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return torch.device(device).type
    except (RuntimeError, ValueError):
        return device


def bf16_native(device_type: str) -> tuple[bool, str]:
    """(does `device_type` compute bfloat16 in hardware, why): the one hardware probe of `auto`."""
    import torch

    if device_type == "cuda":
        if not torch.cuda.is_available():
            return False, "no CUDA device"
        name = torch.cuda.get_device_name()
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"{name} computes bf16"
        return False, f"{name} does not compute bf16"
    if device_type == "cpu":
        capabilities = torch.cpu.get_capabilities()
        if capabilities.get("amx_bf16"):
            return True, "CPU has AMX"
        if capabilities.get("avx512_bf16"):
            return True, "CPU has AVX-512 BF16"
        return False, "CPU has neither AVX-512 BF16 nor AMX"
    return False, f"{device_type} is not probed for bf16"


def wide_vectors(device_type: str) -> tuple[bool, str]:
    """(does `device_type` have 512-bit vector registers, what it has): the CPU probe of
    `data.native_attention: auto` (module docstring)."""
    import torch

    if device_type != "cpu":
        return False, f"{device_type}: not a CPU"
    capabilities = torch.cpu.get_capabilities()
    if capabilities.get("avx512_f"):
        return True, "CPU has AVX-512"
    best = "AVX2" if capabilities.get("avx2") else torch.backends.cpu.get_cpu_capability()
    return False, f"CPU has {best}, not AVX-512: SDPA per example is faster here"


def resolve_native_attention(config: RunConfig) -> tuple[bool, str]:
    """(`data.native_attention`, why) for `auto`: the C++ kernel on a CPU with 512-bit vectors. Off
    the CPU the answer is moot (packed attention on a GPU never takes the CPU kernel) and the reason
    is empty: nothing to say."""
    kind = device_type(config.model.device)
    if kind != "cpu":
        return True, ""
    return wide_vectors(kind)


def resolve_precision(config: RunConfig) -> tuple[str, str, str]:
    """(dtype, precision, reason) for `model.dtype` / `train.precision` of `config`, either or both
    possibly `auto` (module docstring: the rules)."""
    dtype, precision, reason = config.model.dtype, config.train.precision, ""
    quantized = config.model.quantization.bits is not None
    frozen_base = config.method.name in FROZEN_BASE_METHODS
    if precision == AUTO:
        if quantized:
            precision, reason = "fp32", "quantised base: model.quantization.compute_dtype sets the compute"
        elif dtype == "float16":
            precision, reason = "fp16", "model.dtype is float16"
        else:
            native, reason = bf16_native(device_type(config.model.device))
            precision = "bf16" if native else "fp32"
    if dtype == AUTO:
        if quantized or not frozen_base or precision == "fp32":
            dtype = "float32"
        else:
            dtype = "bfloat16" if precision == "bf16" else "float16"
        reason = reason or f"train.precision is {precision}"
        if not frozen_base and precision != "fp32":
            reason += f"; method {config.method.name} trains its weights: float32 master weights"
    return dtype, precision, reason


def resolve_packing(config: RunConfig) -> tuple[bool, str | None]:
    """(packing, the line that says why it is off where `auto` could not use it, or None)."""
    if config.data.packing != AUTO:
        return config.data.packing, None
    if config.objective.name != "sft":
        return False, None  # the objectives that pad: nothing new to say
    if config.method.name == "prefix":
        return False, (
            "[tunelab] data.packing auto -> false: prefix tuning's prefix is a key/value cache before "
            "the tokens, which packed attention cannot take; rows are padded"
        )
    return True, None


def resolve_fused_kernels(config: RunConfig) -> bool:
    """`train.fused_kernels: auto`: on for a CPU run in bf16 or fp32 precision that is not compiled
    (compiling fuses these operations itself); off on other devices (the kernels are CPU code) and
    for fp16 (float16 tensors take transformers' chain anyway)."""
    on_cpu = device_type(config.model.device) == "cpu"
    return on_cpu and config.train.precision in ("bf16", "fp32") and not config.train.compile


def resolve_defaults(config: RunConfig) -> None:
    """Replace the `auto` values of `config` by concrete ones, in place; keep in `config.auto_keys`
    the keys that were `auto`, and in `config.default_notes` the lines the run prints about them
    (`setup_run`): what `auto` became and why, and each fallback."""
    config.auto_keys = [
        key
        for key, value in [
            ("model.dtype", config.model.dtype),
            ("train.precision", config.train.precision),
            ("data.packing", config.data.packing),
            ("data.native_attention", config.data.native_attention),
            ("train.fused_kernels", config.train.fused_kernels),
        ]
        if value == AUTO
    ]
    changed = []
    if AUTO in (config.model.dtype, config.train.precision):
        dtype, precision, reason = resolve_precision(config)
        if config.model.dtype == AUTO:
            changed.append(f"model.dtype auto -> {dtype}")
        if config.train.precision == AUTO:
            changed.append(f"train.precision auto -> {precision}")
        changed[-1] += f" ({reason})"
        config.model.dtype, config.train.precision = dtype, precision
    packing, fallback = resolve_packing(config)
    if config.data.packing == AUTO and packing:
        changed.append("data.packing auto -> true")
    config.data.packing = packing
    if config.data.native_attention == AUTO:
        native, reason = resolve_native_attention(config)
        if packing and reason:  # said where it matters: a packed run on the CPU
            changed.append(f"data.native_attention auto -> {str(native).lower()} ({reason})")
        config.data.native_attention = native
    if config.train.fused_kernels == AUTO:
        config.train.fused_kernels = resolve_fused_kernels(config)
        if config.train.fused_kernels:
            changed.append("train.fused_kernels auto -> true")
    config.default_notes = [f"[tunelab] defaults: {', '.join(changed)}"] if changed else []
    if fallback:
        config.default_notes.append(fallback)
    emulated = emulated_bf16(config)
    if emulated:
        config.default_notes.append(emulated)


def emulated_bf16(config: RunConfig) -> str | None:
    """The warning for bf16 asked for by name on a CPU that does not compute it, or None: there its
    matrix products are emulated (a Zen 3 EPYC with AVX2: 1.2 GFLOP/s in bf16 against 106 in float32,
    a (1500, 512) x (512, 1536) product), so a run that would take minutes takes hours."""
    asked = [
        key
        for key, value in (("train.precision", config.train.precision), ("model.dtype", config.model.dtype))
        if key not in config.auto_keys and value in ("bf16", "bfloat16")
    ]
    if not asked or config.model.quantization.bits is not None:
        return None
    kind = device_type(config.model.device)
    native, reason = bf16_native(kind)
    if native or kind != "cpu":
        return None
    verb = "asks" if len(asked) == 1 else "ask"
    return (
        f"[tunelab] warning: {' and '.join(asked)} {verb} for bf16, but this {reason}: bf16 matrix "
        "products are emulated here, tens of times slower than float32 (leave both auto to train in float32)"
    )

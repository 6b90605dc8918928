"""The `auto` defaults (tunelab/defaults.py, issue 17): what a minimal config (model, method, data)
resolves to for each method x objective, with bf16 hardware and without, the one-line notes and
fallbacks, and that an explicit value always wins.

The hardware probes `bf16_native` and `wide_vectors` are monkeypatched in every test of `auto`: the
figures must not depend on the machine the tests run on (one CPU here had AVX-512 BF16, another
only AVX2; a CI runner may have either).
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from tunelab import defaults
from tunelab.config import load_config
from tunelab.errors import ConfigError

METHODS = ["full", "partial", "lora", "adapter", "prefix"]
OBJECTIVES = ["sft", "reward", "dpo", "kto", "ppo", "grpo"]
FROZEN_BASE = {"partial", "lora", "adapter", "prefix"}
OBJECTIVE_OPTIONS = {
    "ppo": {"reward_functions": ["tunelab.rl.rewards:one_line"]},
    "grpo": {"reward_functions": ["tunelab.rl.rewards:one_line"]},
}
"""What the online objectives cannot go without."""


@pytest.fixture
def native(monkeypatch):
    """Set what the hardware probes answer: `native(True)` (bf16 and AVX-512: a CPU with AVX-512 BF16)
    or `native(False)` (neither); `wide=` sets the vector probe apart."""

    def set_native(answer: bool, wide: bool | None = None):
        reason = "probe says bf16" if answer else "probe says no bf16"
        monkeypatch.setattr(defaults, "bf16_native", lambda device_type: (answer, reason))
        wide = answer if wide is None else wide
        vectors = "probe says AVX-512" if wide else "probe says AVX2"
        monkeypatch.setattr(defaults, "wide_vectors", lambda device_type: (wide, vectors))

    return set_native


def minimal(method="lora", objective="sft", model=None, train=None, data=None, overrides=()):
    """A config naming only the model, the method and the data (+ what a test adds)."""
    return load_config(
        None,
        list(overrides),
        model={"name_or_path": "m", **(model or {})},
        method={"name": method},
        objective={"name": objective, **OBJECTIVE_OPTIONS.get(objective, {})},
        data={"train": "x.jsonl", **(data or {})},
        train=train or {},
    )


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16-native", "no-bf16"])
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("method", METHODS)
def test_a_minimal_config_resolves_to_the_fast_path(native, method, objective, bf16):
    native(bf16)
    config = minimal(method, objective)
    if bf16:
        expected_dtype = "bfloat16" if method in FROZEN_BASE else "float32"  # full: float32 master weights
        assert (config.model.dtype, config.train.precision) == (expected_dtype, "bf16")
    else:
        assert (config.model.dtype, config.train.precision) == ("float32", "fp32")
    assert config.data.packing is (objective == "sft" and method != "prefix")
    assert config.train.fused_kernels is True  # a CPU run (no CUDA here), bf16 or fp32
    assert config.data.native_attention is bf16  # the probes say AVX-512 with bf16, AVX2 without
    assert config.auto_keys == [
        "model.dtype",
        "train.precision",
        "data.packing",
        "data.native_attention",
        "train.fused_kernels",
    ]
    # The run's config.yaml holds the concrete values and none of the bookkeeping.
    plain = config.to_dict()
    assert "auto" not in (plain["model"]["dtype"], plain["train"]["precision"], plain["data"]["packing"])
    assert "default_notes" not in plain and "auto_keys" not in plain
    assert yaml.safe_load(yaml.safe_dump(plain))["model"]["dtype"] == config.model.dtype


def test_the_notes_say_what_auto_became_and_why(native):
    native(True)
    assert minimal("lora").default_notes == [
        "[tunelab] defaults: model.dtype auto -> bfloat16, train.precision auto -> bf16 (probe says bf16), "
        "data.packing auto -> true, data.native_attention auto -> true (probe says AVX-512), "
        "train.fused_kernels auto -> true"
    ]
    (line,) = minimal("full").default_notes
    assert "model.dtype auto -> float32, train.precision auto -> bf16 (probe says bf16; method full" in line
    native(False)
    assert minimal("lora", "dpo").default_notes == [
        "[tunelab] defaults: model.dtype auto -> float32, train.precision auto -> fp32 (probe says no bf16), "
        "train.fused_kernels auto -> true"
    ]


def test_prefix_sft_falls_back_to_padded_rows_in_one_line(native):
    native(False)
    config = minimal("prefix")
    assert config.data.packing is False
    fallback = config.default_notes[-1]
    assert fallback.startswith("[tunelab] data.packing auto -> false: prefix tuning's prefix is a key/value")
    assert fallback.endswith("rows are padded") and "\n" not in fallback
    # The objectives that pad say nothing new for `auto`.
    for objective in OBJECTIVES[1:]:
        notes = minimal("lora", objective).default_notes
        assert not any("packing" in line for line in notes), (objective, notes)


def test_explicit_values_win(native):
    native(True)
    pinned = minimal(model={"dtype": "float32"}, train={"precision": "fp32"}, data={"packing": False})
    assert (pinned.model.dtype, pinned.train.precision, pinned.data.packing) == ("float32", "fp32", False)
    assert pinned.auto_keys == [
        "data.native_attention",
        "train.fused_kernels",
    ]  # without packing, the attention kernel is moot: silent
    assert pinned.default_notes == ["[tunelab] defaults: train.fused_kernels auto -> true"]
    assert pinned.train.fused_kernels is True
    # One explicit, the other `auto`: `auto` follows the explicit one.
    assert minimal(train={"precision": "fp32"}).model.dtype == "float32"
    assert minimal(model={"dtype": "float32"}).train.precision == "bf16"
    assert minimal(model={"dtype": "float16"}).train.precision == "fp16"
    native(False)
    assert minimal(train={"precision": "bf16"}).model.dtype == "bfloat16"  # asked for: kept
    assert minimal("full", train={"precision": "bf16"}).model.dtype == "float32"
    assert minimal(train={"precision": "fp16"}).model.dtype == "float16"
    assert minimal(model={"dtype": "bfloat16"}).train.precision == "fp32"
    # Overrides are explicit values too; `auto` can be asked for by name.
    overridden = minimal(overrides=["model.dtype=bfloat16", "train.precision=bf16", "data.packing=auto"])
    assert (overridden.model.dtype, overridden.train.precision, overridden.data.packing) == (
        "bfloat16",
        "bf16",
        True,
    )
    # An explicit `true` where packing cannot apply: ignored by the padding objectives, refused for
    # prefix SFT, as before.
    assert minimal("lora", "dpo", data={"packing": True}).data.packing is True
    with pytest.raises(ConfigError, match="data.packing: cannot be used with method.name: prefix"):
        minimal("prefix", data={"packing": True})


def test_fused_kernels_are_on_for_cpu_bf16_and_fp32_runs(native, monkeypatch):
    native(True)
    assert minimal().train.fused_kernels is True
    assert minimal(train={"precision": "fp32"}).train.fused_kernels is True
    assert minimal(train={"precision": "fp16"}).train.fused_kernels is False  # float16: transformers' chain
    assert minimal(train={"compile": True}).train.fused_kernels is False  # the compiler fuses these itself
    assert minimal(train={"fused_kernels": False}).train.fused_kernels is False  # explicit wins
    assert minimal(train={"precision": "fp32", "fused_kernels": True}).train.fused_kernels is True
    monkeypatch.setattr(defaults, "device_type", lambda device: "cuda")
    assert minimal().train.fused_kernels is False  # the kernels are CPU code


def test_the_attention_kernel_is_taken_with_avx512_only(native, monkeypatch):
    """`data.native_attention: auto`: the C++ kernel with 512-bit vectors, SDPA per example elsewhere,
    said in the defaults line when the run packs on the CPU; an explicit value wins."""
    native(False, wide=True)  # AVX-512 without bf16 (Skylake-X): float32, the kernel
    config = minimal()
    assert config.data.native_attention is True
    assert "data.native_attention auto -> true (probe says AVX-512)" in config.default_notes[0]
    native(True, wide=False)
    config = minimal()
    assert config.data.native_attention is False
    assert "data.native_attention auto -> false (probe says AVX2)" in config.default_notes[0]
    assert minimal(data={"native_attention": True}).data.native_attention is True  # explicit wins
    notes = minimal("lora", "dpo").default_notes  # no packing: nothing to say about its kernel
    assert not any("native_attention" in line for line in notes)
    monkeypatch.setattr(defaults, "device_type", lambda device: "cuda")
    config = minimal()
    assert config.data.native_attention is True  # moot on a GPU: packed attention never takes it there
    assert not any("native_attention" in line for line in config.default_notes)


def test_bf16_by_name_on_a_cpu_without_it_warns_in_one_line(native, monkeypatch):
    """bf16 asked for on a CPU that emulates it: a warning naming the keys; none where auto chose,
    where the CPU computes bf16, or on a GPU (its own probe)."""
    native(False)
    (warning,) = [n for n in minimal(train={"precision": "bf16"}).default_notes if "warning" in n]
    assert warning.startswith("[tunelab] warning: train.precision asks for bf16, but this probe says no bf16")
    both = minimal(model={"dtype": "bfloat16"}, train={"precision": "bf16"}).default_notes[-1]
    assert "train.precision and model.dtype ask for bf16" in both and "\n" not in both
    assert not any("warning" in n for n in minimal().default_notes)  # auto: float32, nothing to say
    native(True)
    assert not any("warning" in n for n in minimal(train={"precision": "bf16"}).default_notes)
    native(False)
    monkeypatch.setattr(defaults, "device_type", lambda device: "cuda")
    assert not any("warning" in n for n in minimal(train={"precision": "bf16"}).default_notes)


def test_a_quantised_base_keeps_its_rules(native):
    native(True)
    config = minimal("lora", model={"quantization": {"bits": 4}})
    assert (config.model.dtype, config.train.precision) == ("float32", "fp32")
    assert "quantised base" in config.default_notes[0]
    with pytest.raises(ConfigError, match="model.quantization.bits: cannot train method.name: full"):
        minimal("full", model={"quantization": {"bits": 4}})


def test_the_hardware_probe(monkeypatch):
    """CPU: AMX or AVX-512 BF16 computes bf16, neither does not; CUDA asks torch; others are not
    probed. `model.device` is read as the device type it names."""
    for capabilities, expected in [
        ({"amx_bf16": True, "avx512_bf16": False}, (True, "CPU has AMX")),
        ({"amx_bf16": False, "avx512_bf16": True}, (True, "CPU has AVX-512 BF16")),
        ({"amx_bf16": False, "avx512_bf16": False}, (False, "CPU has neither AVX-512 BF16 nor AMX")),
    ]:
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda c=capabilities: c)
        assert defaults.bf16_native("cpu") == expected
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert defaults.bf16_native("cuda") == (False, "no CUDA device")
    assert defaults.device_type("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "GPU X")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert defaults.bf16_native("cuda") == (False, "GPU X does not compute bf16")
    assert defaults.device_type("auto") == "cuda" and defaults.device_type("cuda:1") == "cuda"
    assert defaults.bf16_native("mps")[0] is False


def test_the_vector_probe(monkeypatch):
    """AVX-512 (its foundation, `avx512_f`) is wide; AVX2 or anything else is not, and says what it has."""
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_f": True, "avx2": True})
    assert defaults.wide_vectors("cpu") == (True, "CPU has AVX-512")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_f": False, "avx2": True})
    assert defaults.wide_vectors("cpu") == (
        False,
        "CPU has AVX2, not AVX-512: SDPA per example is faster here",
    )
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {})
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "NO AVX")
    assert defaults.wide_vectors("cpu")[1].startswith("CPU has NO AVX, not AVX-512")
    assert defaults.wide_vectors("cuda")[0] is False


def test_the_run_prints_the_defaults_line(native, llama_dir, tmp_path, capsys):
    """`setup_run` prints what `auto` became (and the fallbacks), one line each."""
    from tunelab.training.setup import setup_run

    native(False)
    config = load_config(
        None,
        [],
        model={"name_or_path": str(llama_dir)},
        method={"name": "prefix", "num_virtual_tokens": 2},
        data={"train": "x.jsonl"},
        train={"progress": False},
        output_dir=str(tmp_path / "run"),
    )
    setup_run(config)
    out = capsys.readouterr().out.splitlines()
    assert (
        "[tunelab] defaults: model.dtype auto -> float32, train.precision auto -> fp32 (probe says no bf16), "
        "train.fused_kernels auto -> true" in out
    )
    assert sum(line.startswith("[tunelab] data.packing auto -> false: prefix tuning") for line in out) == 1


def fake_run(config, model):
    printed = []
    return SimpleNamespace(config=config, model=model, print=printed.append, config_yaml=""), printed


def test_sft_pads_where_the_model_cannot_take_packed_attention(native, llama_dir):
    """`data.packing: auto` with a model packed attention cannot serve (an attention kernel it does
    not wrap, a sliding window shorter than `data.max_length`): padded rows, one line, and the
    run's config.yaml says `packing: false`. An explicit `true` is left to fail as before."""
    from transformers import AutoModelForCausalLM

    from tunelab.objectives.sft import unpacked_fallback

    native(False)
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    config = minimal(data={"max_length": 64})
    run, printed = fake_run(config, model)
    unpacked_fallback(run)  # sdpa, no window: packing stays
    assert config.data.packing is True and printed == []

    model.model.layers[1].self_attn.sliding_window = 16
    unpacked_fallback(run)
    assert config.data.packing is False and yaml.safe_load(run.config_yaml)["data"]["packing"] is False
    (line,) = printed
    assert line == (
        "[tunelab] data.packing auto -> false: packed attention has no sliding window, and the model's "
        "16 < data.max_length; rows are padded"
    )
    model.model.layers[1].self_attn.sliding_window = None

    config = minimal(data={"max_length": 64})
    model.config._attn_implementation = "flex_attention"
    run, printed = fake_run(config, model)
    unpacked_fallback(run)
    assert config.data.packing is False and "the model uses 'flex_attention'" in printed[0]

    explicit = minimal(data={"max_length": 64, "packing": True})
    run, printed = fake_run(explicit, model)
    unpacked_fallback(run)
    assert explicit.data.packing is True and printed == []


RLHF = Path(__file__).resolve().parents[2] / "data" / "rlhf"
TRAIN_FILES = {"sft": None, "reward": "preference_train.jsonl", "dpo": "preference_train.jsonl"}
TRAIN_FILES |= {"kto": "preference_train.jsonl", "ppo": "prompts_train.jsonl", "grpo": "prompts_train.jsonl"}
SMOKE = {
    "ppo": {"max_new_tokens": 4, "ppo_epochs": 1},
    "grpo": {"max_new_tokens": 4, "num_generations": 2},
}


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_objective_trains_on_the_bf16_defaults(
    native, llama_dir, instruction_data, tmp_path, objective
):
    """The defaults of bf16 hardware (a bf16 frozen base, float32 LoRA weights, bf16 autocast;
    packing for SFT) train every objective: 2 steps with finite losses, and the run's config.yaml
    holds the concrete values."""
    import tunelab
    from tunelab.training.metrics import read_metrics

    native(True)
    train = RLHF / TRAIN_FILES[objective] if TRAIN_FILES[objective] else instruction_data[0]
    options = {**OBJECTIVE_OPTIONS.get(objective, {}), **SMOKE.get(objective, {})}
    out = tmp_path / objective
    config = load_config(
        None,
        [],
        model={"name_or_path": str(llama_dir)},
        method={"name": "lora", "r": 4, "alpha": 8},
        objective={"name": objective, **options},
        data={"train": str(train), "template": "alpaca", "max_length": 64, "max_records": 16},
        train={"max_steps": 2, "batch_size": 4, "progress": False, "seed": 0},
        eval={"generate": False},
        output_dir=str(out),
    )
    tunelab.train(config)
    assert all(math.isfinite(row["loss"]) for row in read_metrics(out))
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["model"]["dtype"], saved["train"]["precision"]) == ("bfloat16", "bf16")
    assert saved["data"]["packing"] is (objective == "sft")

"""The memory planner (`tunelab.memory_plan`, `tunelab inspect`): each part's bytes on a tiny Llama
config against counts derived by hand below, the fit/advice logic, and the command's output.

The tiny Llama: vocab V = 256, hidden H = 64, L = 2 layers, 4 heads of 16, 2 key/value heads
(H_kv = 32), MLP I = 128, untied LM head. Per layer: q, o 64 x 64 = 4,096 each; k, v 32 x 64 =
2,048 each; gate, up, down 64 x 128 = 8,192 each (36,864 linear weights, 512 output rows); two
norms of 64. Whole model: 2 x 36,992 + embeddings 16,384 + LM head 16,384 + final norm 64 = 106,816.
LoRA r = 4 on all seven linears: r (in + out) = 512 + 384 + 384 + 512 + 768 x 3 = 4,096 per layer,
8,192 in all; DoRA adds a magnitude per output row, 512 per layer.

Activations for batch 2 x max length 16 = 32 tokens, float32 (a = 4): one block saves
A = 9 H + 3 H_kv + 4 I = 576 + 96 + 512 = 1,184 values per token (+ 7 r = 28 with LoRA; + 2 (3 H +
2 H_kv + 2 I) = 1,024 with DoRA); outside the blocks 3 H a + 4 H = 1,024 bytes; backward's working
set W = 2 I + 4 H = 512 (+ A with checkpointing). Without checkpointing: saved 32 x (2 x 1,184 x 4
+ 1,024) = 335,872, working 32 x 512 x 4 = 65,536; with it: saved 32 x (2 x 64 x 4 + 1,024) =
49,152, working 32 x (1,184 + 512) x 4 = 217,088. Loss chunk: 2 x 32 x 256 x 4 = 65,536.
The measured check against a training run is benchmarks/memory_plan.py (CPU memory is too noisy
for a unit test; BENCHMARKS.md has its figures).
"""

from __future__ import annotations

import pytest

from tests.helpers import PINNED_MODEL, PINNED_TRAIN
from tunelab.cli import main
from tunelab.config import load_config
from tunelab.errors import TunelabError
from tunelab.inspection import build_meta_model, estimate_memory, memory_report
from tunelab.memory_plan import parse_size, plan
from tunelab.methods import get_method
from tunelab.tiny import tiny_config

LORA = {"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A config.json only: the planner never reads weights."""
    root = tmp_path_factory.mktemp("memory-plan-model")
    tiny_config(
        "llama", vocab_size=256, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128
    ).save_pretrained(root)
    return root


def run_config(model_dir, method=None, model=None, train=None, data=None):
    return load_config(
        None,
        [],
        model={"name_or_path": str(model_dir), **PINNED_MODEL, **(model or {})},
        method=method or {"name": "full"},
        data={"train": "unused.jsonl", "max_length": 16, **(data or {})},
        train={"batch_size": 2, **PINNED_TRAIN, **(train or {})},
    )


def planned(config, world_size=1):
    meta = build_meta_model(config.model.name_or_path, dtype=config.model.dtype)
    get_method(config.method.name).apply(meta, config.method.options)
    return plan(meta, config, world_size)


def test_full_fine_tuning_parts(model_dir):
    memory = planned(run_config(model_dir))
    assert (memory.weights, memory.trainable, memory.gradients) == (0, 3 * 106_816 * 4, 106_816 * 4)
    assert (memory.activations, memory.working, memory.loss) == (335_872, 65_536, 65_536)
    assert (memory.transient, memory.tokens) == (0, 32)
    # end of backward, gradients + working (492,800), outlasts the loss's moment (401,408) here
    assert memory.total == 3 * 106_816 * 4 + 106_816 * 4 + 65_536
    with_checkpointing = planned(run_config(model_dir, model={"gradient_checkpointing": True}))
    assert (with_checkpointing.activations, with_checkpointing.working) == (49_152, 217_088)
    # every 2nd of the 2 blocks: one keeps its input only (64 x 4 bytes a token), the other all it
    # saves (4,736 bytes a token, from the two figures above), + 1,024 outside the blocks
    every_2nd = planned(run_config(model_dir, model={"gradient_checkpointing": True, "checkpoint_every": 2}))
    assert (every_2nd.activations, every_2nd.working) == (32 * (256 + 4_736 + 1_024), 217_088)
    # a budget of 16 tokens per forward pass halves the 2 x 16 tokens of the micro-batch
    budgeted = planned(run_config(model_dir, train={"max_micro_batch_tokens": 16}))
    assert budgeted.tokens == 16 and budgeted.activations == memory.activations // 2
    unchunked = planned(run_config(model_dir, train={"chunked_loss": False}))
    assert unchunked.loss == 4 * 32 * 256 * 4


def test_lora_and_dora_parts(model_dir):
    lora = planned(run_config(model_dir, LORA))
    assert (lora.weights, lora.trainable, lora.gradients) == (106_816 * 4, 3 * 8_192 * 4, 8_192 * 4)
    assert lora.activations == 32 * (2 * (1_184 + 28) * 4 + 1_024)
    assert lora.total == 106_816 * 4 + 3 * 8_192 * 4 + lora.activations + 65_536  # the loss's moment
    dora = planned(run_config(model_dir, {**LORA, "use_dora": True}))
    assert dora.trainable == 3 * (8_192 + 2 * 512) * 4
    assert dora.activations == 32 * (2 * (1_184 + 28 + 1_024) * 4 + 1_024)
    assert dora.transient == 8_192 * 4  # W + s B A of the largest linear, float32
    # dropout: each wrapped linear keeps its dropped input (64 x 6 + 128 = 512 features) and a bool mask
    dropped = planned(run_config(model_dir, {**LORA, "dropout": 0.1}))
    assert dropped.activations == lora.activations + 32 * 2 * 512 * (4 + 1)


def test_half_precision_base_keeps_float32_adapters(model_dir):
    memory = planned(run_config(model_dir, LORA, model={"dtype": "bfloat16"}, train={"precision": "bf16"}))
    assert (memory.weights, memory.trainable) == (106_816 * 2, 3 * 8_192 * 4)
    assert memory.activations == 32 * (2 * (1_184 + 28) * 2 + 3 * 64 * 2 + 4 * 64)
    assert memory.working == 32 * 512 * 2
    # full fine-tuning under bf16 autocast: the trained weights become float32 in place
    full = planned(run_config(model_dir, model={"dtype": "bfloat16"}, train={"precision": "bf16"}))
    assert (full.weights, full.trainable, full.gradients) == (0, 3 * 106_816 * 4, 106_816 * 4)


def test_quantised_weights(model_dir):
    """4 bits: 0.5 byte + a float32 absmax per 64 = 0.5625 byte per decoder linear weight; 8 bits:
    1 byte + a float32 per row; embeddings, norms (2 x 2 x 64 + 64) and LM head stay float32."""
    rest = (16_384 + 16_384 + 320) * 4
    four = planned(run_config(model_dir, LORA, model={"quantization": {"bits": 4}}))
    assert four.weights == rest + 2 * 36_864 * 9 // 16
    assert four.transient == 8_192 * 4  # one linear dequantised to float32 for its matmul
    double = planned(run_config(model_dir, LORA, model={"quantization": {"bits": 4, "double_quant": True}}))
    # per weight of n: n / 2 + n / 64 one-byte absmax + a float32 per 256 absmax (one block here)
    per_layer = sum(n // 2 + n // 64 + 4 for n in (4_096, 2_048, 2_048, 4_096, 8_192, 8_192, 8_192))
    assert double.weights == rest + 2 * per_layer
    eight = planned(run_config(model_dir, LORA, model={"quantization": {"bits": 8}}))
    assert eight.weights == rest + 2 * (36_864 + 4 * 512)


def test_fsdp_shards_weights_and_state_and_gathers_one_block(model_dir):
    config = run_config(model_dir, train={"strategy": "fsdp"})
    one, two = planned(config), planned(config, world_size=2)
    assert (two.trainable, two.gradients) == (one.trainable // 2, one.gradients // 2)
    assert two.activations == one.activations
    assert two.transient == 36_992 * 4
    ddp = planned(run_config(model_dir, train={"strategy": "ddp"}), world_size=2)
    assert ddp.trainable == one.trainable


def test_advice_names_the_switches_that_fit(model_dir):
    config = run_config(model_dir, train={"batch_size": 8}, data={"max_length": 64})
    total = estimate_memory(config).total
    assert "fits in" in memory_report(config, device_memory=total)
    checkpointed = run_config(
        model_dir, model={"gradient_checkpointing": True}, train={"batch_size": 8}, data={"max_length": 64}
    )
    budget = estimate_memory(checkpointed).total
    report = memory_report(config, device_memory=budget)
    assert f"does not fit in {budget / 1e6:.0f} MB; each switch alone:" in report
    lines = {line.split()[0]: line for line in report.splitlines()[-5:]}
    assert lines["model.gradient_checkpointing=true"].endswith(f"{budget / 1e6:.0f} MB  fits")
    # activations dominate this tiny model: LoRA keeps them and does not fit
    assert lines["method.name=lora"].endswith(" does not fit")
    assert "train.batch_size=1" in report and "train.grad_accum=8" in report
    assert "model.quantization.bits=4" not in report  # full fine-tuning cannot train on a 4-bit base
    lora = run_config(model_dir, LORA, train={"batch_size": 8}, data={"max_length": 64})
    assert "model.quantization.bits=4" in memory_report(lora, device_memory=1)


def test_switches_combined_when_none_fits_alone(model_dir):
    config = run_config(model_dir, train={"batch_size": 8}, data={"max_length": 64})
    lora = {**LORA, "r": 16, "alpha": 32}
    smallest = run_config(
        model_dir,
        lora,
        {"gradient_checkpointing": True},
        {"batch_size": 1, "grad_accum": 8},
        {"max_length": 64},
    )
    budget = estimate_memory(smallest).total
    report = memory_report(config, device_memory=budget)
    assert " fits\n" not in report  # no switch alone
    together = report.splitlines()[-1]
    assert together.startswith("  together: ") and together.endswith(" fits")
    for change in (
        "train.batch_size=1 train.grad_accum=8",
        "method.name=lora",
        "model.gradient_checkpointing=true",
    ):
        assert change in together
    assert "no combination of these fits" in memory_report(config, device_memory=1)


def test_parse_size():
    assert parse_size("24GB") == 24 * 10**9
    assert parse_size("80 GiB") == 80 * 2**30
    assert parse_size("512mb") == 512 * 10**6
    with pytest.raises(TunelabError, match="--device-memory"):
        parse_size("lots")


def test_inspect_command_prints_the_plan(model_dir, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(
        f"model: {{name_or_path: {model_dir}, gradient_checkpointing: true}}\n"
        "method: {name: lora, r: 4, alpha: 8, target_modules: all-linear}\n"
        "data: {train: unused.jsonl, max_length: 16}\ntrain: {batch_size: 2}\n"
    )
    assert main(["inspect", str(path), "--device-memory", "24GB"]) == 0
    out = capsys.readouterr().out
    assert "trainable params: 8,192 || all params: 115,008" in out
    assert "expected peak memory per device:" in out
    assert "activations saved (32 tokens, checkpointing on)" in out
    assert "fits in 24.00 GB" in out

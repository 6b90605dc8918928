"""Every performance switch trains, and the bf16-base LoRA computes the fp32 gradients closely.

Switches: `data.packing`, `data.group_by_length`, `train.chunked_loss`, `model.dtype=bfloat16`
with `train.precision=bf16` (frozen base in bf16, float32 adapters), `model.gradient_checkpointing`,
`train.compile`. Their measured effects are in BENCHMARKS.md; no timing is asserted here.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import tunelab
from tests.helpers import sft_config
from tunelab.data.collate import pad_batch
from tunelab.data.packing import pack_batch
from tunelab.data.tokenize import IGNORE_INDEX, TokenizedExample
from tunelab.kernels.packed_attention import use_packed_attention
from tunelab.logprobs import model_lm_loss_sum
from tunelab.methods import lora, trainable_parameters
from tunelab.models import load_model
from tunelab.training.metrics import read_metrics

LORA = {"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"}
SWITCHES = {
    "defaults": [],
    "packing": ["data.packing=true"],
    "group_by_length": ["data.group_by_length=true"],
    "full_logits": ["train.chunked_loss=false"],
    "bf16_base": ["model.dtype=bfloat16", "train.precision=bf16"],
    "checkpointing": ["model.gradient_checkpointing=true", "data.packing=true"],
    "all_fast": [
        "data.packing=true",
        "model.dtype=bfloat16",
        "train.precision=bf16",
        "train.loss_chunk_size=16",
    ],
}


def _check_trained(out, model_dir, method):
    rows = read_metrics(out)
    losses = [r["loss"] for r in rows]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2
    final = out / "final"
    if method == "lora":
        adapter = load_file(final / "adapter_model.safetensors")
        assert adapter and all(float(t.abs().sum()) > 0 for k, t in adapter.items() if "lora_B" in k)
    else:
        before, after = load_file(model_dir / "model.safetensors"), load_file(final / "model.safetensors")
        assert all(not torch.equal(before[k], after[k].to(before[k].dtype)) for k in before)


SAME_STEPS = {"full_logits": "defaults", "checkpointing": "packing"}
"""Switches that change how a step is computed, not the step: switch -> the run whose losses it has,
within 1e-6 relative. Checkpointing recomputes the same forward (measured: bitwise equal losses);
full logits vs the chunked loss sum the same float32 terms in another order (measured: at most
8e-8 relative over the 6 steps). A wrong gradient in either path moves the losses of steps 2-6 by
1e-5 relative or more, even a gradient off by a constant factor (which Adam nearly cancels)."""


@pytest.fixture(scope="module")
def lora_losses(tiny_model_dirs, instruction_data, tmp_path_factory):
    """switch -> the losses of its LoRA run (checked by `_check_trained`), each run trained once."""
    model_dir, runs = tiny_model_dirs["llama"], {}

    def losses(switch: str) -> list[float]:
        if switch not in runs:
            out = tmp_path_factory.mktemp(switch)
            tunelab.train(sft_config(model_dir, instruction_data[0], out, *SWITCHES[switch], method=LORA))
            _check_trained(out, model_dir, "lora")
            runs[switch] = [r["loss"] for r in read_metrics(out)]
        return runs[switch]

    return losses


@pytest.mark.parametrize("switch", sorted(SWITCHES))
def test_every_switch_trains_lora(lora_losses, switch):
    losses = lora_losses(switch)
    if switch in SAME_STEPS:
        assert losses == pytest.approx(lora_losses(SAME_STEPS[switch]), rel=1e-6)


@pytest.mark.parametrize("switch", ["packing", "all_fast"])
def test_fast_switches_train_full_finetuning(tiny_model_dirs, instruction_data, tmp_path, switch):
    model_dir = tiny_model_dirs["qwen2"]
    tunelab.train(sft_config(model_dir, instruction_data[0], tmp_path, *SWITCHES[switch]))
    _check_trained(tmp_path, model_dir, "full")


@pytest.mark.slow  # torch.compile of every block: ~25 s on 2 cores
def test_compile_trains(tiny_model_dirs, instruction_data, tmp_path):
    """`train.compile` compiles every decoder block; with packing the attention stays eager."""
    model_dir = tiny_model_dirs["llama"]
    overrides = ["train.compile=true", "data.packing=true", "train.max_steps=6"]
    tunelab.train(sft_config(model_dir, instruction_data[0], tmp_path / "c", *overrides, method=LORA))
    tunelab.train(
        sft_config(model_dir, instruction_data[0], tmp_path / "e", "data.packing=true", method=LORA)
    )
    _check_trained(tmp_path / "c", model_dir, "lora")
    compiled = [r["loss"] for r in read_metrics(tmp_path / "c")]
    eager = [r["loss"] for r in read_metrics(tmp_path / "e")]
    assert compiled == pytest.approx(eager, rel=1e-3)


def _lora_model(model_dir, dtype: str):
    torch.manual_seed(0)
    model = load_model(str(model_dir), dtype=dtype, device="cpu")
    lora.apply(model, lora.Options(r=4, alpha=8, target_modules="all-linear"))
    torch.manual_seed(1)
    for layer in lora.lora_layers(model).values():  # B = 0 would make every A-gradient zero
        torch.nn.init.normal_(layer.lora_B.weight, std=0.02)
    return model


@pytest.mark.parametrize("packed", [False, True])
def test_bf16_base_lora_gradients_match_fp32(tiny_model_dirs, packed):
    """Frozen base in bf16 under bf16 autocast (adapters float32) vs everything in float32: the loss
    within 1%, every adapter gradient within a few percent (relative norm) and aligned."""
    model_dir = tiny_model_dirs["llama"]
    fp32, bf16 = _lora_model(model_dir, "float32"), _lora_model(model_dir, "bfloat16")
    assert all(p.dtype == torch.float32 for p in trainable_parameters(bf16).values())
    assert all(p.dtype == torch.bfloat16 for n, p in bf16.named_parameters() if "lora_" not in n)
    g = torch.Generator().manual_seed(3)
    exs = []
    for n in (20, 33, 12, 27):
        ids = torch.randint(10, fp32.config.vocab_size, (n,), generator=g).tolist()
        exs.append(TokenizedExample(ids, [IGNORE_INDEX] * 5 + ids[5:]))
    batch = pack_batch(exs) if packed else pad_batch(exs, 0)
    if packed:
        use_packed_attention(fp32), use_packed_attention(bf16)
    loss32 = model_lm_loss_sum(fp32, batch)
    loss32.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16 = model_lm_loss_sum(bf16, batch)
    loss16.backward()
    assert float(loss16.detach()) == pytest.approx(float(loss32.detach()), rel=1e-2)
    grads32, grads16 = trainable_parameters(fp32), trainable_parameters(bf16)
    worst = 0.0
    for name, p in grads32.items():
        a, b = p.grad.flatten(), grads16[name].grad.flatten()
        if float(a.norm()) == 0.0:
            continue
        assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.999, name
        worst = max(worst, float((a - b).norm() / a.norm()))
    assert worst < 0.05  # measured: 1.2%


def test_optimizer_is_fused_and_steps_like_plain_adamw():
    """build_optimizer takes the fused AdamW kernel on CPU; its steps equal the default
    implementation's (decay on matrices only) up to rounding."""
    from tunelab.config import TrainConfig
    from tunelab.training.optim import build_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    twin = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    twin.load_state_dict(model.state_dict())
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1)
    start = [p.detach().clone() for p in model.parameters()]
    fused = build_optimizer(model, cfg)
    assert fused.defaults["fused"] is True
    matrices = [p for p in twin.parameters() if p.ndim >= 2]
    others = [p for p in twin.parameters() if p.ndim < 2]
    plain = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}],
        lr=1e-2,
        betas=tuple(cfg.betas),
        foreach=False,
    )
    x = torch.randn(16, 6)
    for _ in range(5):
        for net, opt in ((model, fused), (twin, plain)):
            opt.zero_grad()
            net(x).square().sum().backward()
            opt.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    assert all(not torch.equal(a, b) for a, b in zip(model.parameters(), start, strict=True))  # it trained

"""Every method in every dtype path (issue 17): a half-precision base, with and without autocast.

The base loads in `model.dtype`; with `train.precision` bf16/fp16 the trainable parameters are kept
in float32 and the training forwards run under autocast, while evaluation, generation and a loaded
`final/` may run outside it. For each method (full, partial, LoRA, DoRA, each adapter placement,
prefix; and the options that train base-model parameters: LoRA's `modules_to_save`, the adapters'
`train_layer_norms`, prefix's MLP) x dtype path (bf16 base + bf16, fp16 base + fp16, bf16 base +
fp32), one cell:

- a 2-step SFT run on the tiny Llama, evaluating after each step (held-out loss and a greedy answer
  to a sample prompt) and at the end (exact match by greedy generation on two examples): finite;
- `load_trained(final/)` in `model.dtype`: its logits, outside autocast, equal the in-memory trained
  model's exactly where both hold the same weights, else within the dtype's tolerance (`ATOL`), and
  their greedy generations agree; for the bf16 path, `tunelab eval` and `tunelab generate` on it;
- LoRA and DoRA: the merged model's logits equal the trained model's within the dtype's tolerance.

The trained weights are randomised before saving (a 2-step run leaves LoRA's B and the adapters'
up-projection near zero, which would pass the round trip trivially). fp16 runs on CPU: every cell
runs, none is skipped.
"""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch

from tests.helpers import sft_config
from tunelab.cli import main
from tunelab.generation import generate
from tunelab.methods import lora, trainable_parameters
from tunelab.objectives import sft
from tunelab.trained import load_trained

METHODS = {
    "full": {"name": "full"},
    "partial": {"name": "partial", "last_layers": 1},
    "lora": {"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"},
    "dora": {"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear", "use_dora": True},
    "adapter-houlsby": {"name": "adapter", "placement": "houlsby", "bottleneck": 8},
    "adapter-pfeiffer": {"name": "adapter", "placement": "pfeiffer", "bottleneck": 8},
    "adapter-parallel": {"name": "adapter", "placement": "parallel", "bottleneck": 8, "scale": 4.0},
    "prefix": {"name": "prefix", "num_virtual_tokens": 4},
    "lora-lm_head": {"name": "lora", "r": 4, "alpha": 8, "modules_to_save": ["lm_head"]},
    "adapter-norms": {"name": "adapter", "placement": "houlsby", "bottleneck": 8, "train_layer_norms": True},
    "prefix-mlp": {
        "name": "prefix",
        "num_virtual_tokens": 4,
        "prefix_projection": True,
        "encoder_hidden_size": 16,
    },
}
# Methods that train parameters of the base model itself: in a bf16/fp16 run those are float32 master
# weights among the half ones, a model that computes under autocast only (`tunelab.generation`).
TRAINS_BASE = {"full", "partial", "lora-lm_head", "adapter-norms"}
# (model.dtype, train.precision)
PATHS = {
    "bf16-base-bf16": ("bfloat16", "bf16"),
    "fp16-base-fp16": ("float16", "fp16"),
    "bf16-base-fp32": ("bfloat16", "fp32"),
}
# Where the in-memory model's trained weights are float32 master weights and the loaded ones are in
# the half dtype (TRAINS_BASE in a bf16/fp16 run; any merged LoRA), the logits (O(1) here) may move
# by a few units in the dtype's last place (eps: bfloat16 2^-7, float16 2^-10); measured at most
# 1.7e-2 and 2.0e-3. Everywhere else the loaded model computes exactly what the trained one does.
ATOL = {"bfloat16": 0.04, "float16": 0.005}
SAMPLE_PROMPT = "Add 2 and 3."


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, instruction_data):
    """8 training and 2 held-out records of the demo data (a 2-step run of batch 4)."""
    root = tmp_path_factory.mktemp("dtype-data")
    train, held_out = instruction_data
    for name, source, count in (("train", train, 8), ("eval", held_out, 2)):
        (root / f"{name}.jsonl").write_text("".join(source.read_text().splitlines(True)[:count]))
    return root / "train.jsonl", root / "eval.jsonl"


def trained_run(monkeypatch, llama_dir, small_data, output_dir, method: dict, dtype: str, precision: str):
    """A 2-step SFT run; returns (its summary, the in-memory run as `save_final` saw it)."""
    seen = {}
    real_save = sft.save_final

    def randomised_save(run, *args, **kwargs):
        randomise(run.model)
        seen["run"] = run
        return real_save(run, *args, **kwargs)

    monkeypatch.setattr(sft, "save_final", randomised_save)
    train, held_out = small_data
    config = sft_config(
        llama_dir,
        train,
        output_dir,
        f"model.dtype={dtype}",
        f"train.precision={precision}",
        "train.max_steps=2",
        "train.batch_size=4",
        "train.eval_every=1",
        "train.lr=1e-3",
        "eval.max_new_tokens=4",
        "eval.num_examples=2",
        f"eval.sample_prompts=[{SAMPLE_PROMPT}]",
        method=method,
        eval_file=held_out,
    )
    return sft.run(config), seen["run"]


@torch.no_grad()
def randomise(model: torch.nn.Module) -> None:
    """Move every trainable parameter by a small random amount (zero-initialised parts included)."""
    generator = torch.Generator().manual_seed(0)
    for p in trainable_parameters(model).values():
        p.add_(0.05 * torch.randn(p.shape, generator=generator).to(p.dtype))


@torch.no_grad()
def logits_of(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids).logits.float()  # (B, T, V)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("method", list(METHODS))
def test_method_in_dtype_path(monkeypatch, capsys, tmp_path, llama_dir, small_data, method, path):
    dtype, precision = PATHS[path]
    summary, run = trained_run(
        monkeypatch, llama_dir, small_data, tmp_path, METHODS[method], dtype, precision
    )
    for key in ("final_train_loss", "eval_loss", "exact_match"):
        assert math.isfinite(summary[key]), (key, summary)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    assert all(math.isfinite(row["loss"]) and math.isfinite(row["eval_loss"]) for row in rows), rows
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [(s["step"], s["prompt"]) for s in samples] == [(1, SAMPLE_PROMPT), (2, SAMPLE_PROMPT)]

    loaded, tokenizer, _ = load_trained(tmp_path / "final", dtype=dtype)
    input_ids = torch.tensor([tokenizer.encode(SAMPLE_PROMPT)])  # (1, T)
    run.model.eval()
    # The adapters' own float32 parts take half inputs outside autocast too (TRAINS_BASE).
    with run.autocast() if method in TRAINS_BASE else contextlib.nullcontext():
        trained = logits_of(run.model, input_ids)  # (1, T, V)
    assert torch.isfinite(trained).all()
    exact = method not in TRAINS_BASE or precision == "fp32"
    atol = 0.0 if exact else ATOL[dtype]
    torch.testing.assert_close(logits_of(loaded, input_ids), trained, atol=atol, rtol=0)
    greedy = generate(loaded, tokenizer, [input_ids[0].tolist()], 4, 1, {"do_sample": False})
    assert greedy.tokens.shape[0] == 1 and greedy.tokens.shape[1] >= 1
    if exact:
        in_memory = generate(run.model, tokenizer, [input_ids[0].tolist()], 4, 1, {"do_sample": False})
        assert greedy.ids == in_memory.ids
    if path == "bf16-base-bf16":  # the commands load the run's final/ as `load_trained` does
        capsys.readouterr()
        assert main(["eval", str(tmp_path), "--dtype", dtype, "--max-new-tokens", "4"]) == 0
        assert math.isfinite(json.loads(capsys.readouterr().out)["eval_loss"])
        command = ["generate", str(tmp_path / "final"), "--prompt", SAMPLE_PROMPT, "--dtype", dtype]
        assert main([*command, "--max-new-tokens", "4"]) == 0
    if METHODS[method]["name"] == "lora":
        lora.merge(loaded)
        torch.testing.assert_close(logits_of(loaded, input_ids), trained, atol=ATOL[dtype], rtol=0)
        merged = generate(loaded, tokenizer, [input_ids[0].tolist()], 4, 1, {"do_sample": False})
        assert merged.tokens.shape == greedy.tokens.shape

"""SFT recipe on tiny models: learning, freezing, loss masks, accumulation, resume, final folder."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import tunelab
from tests.helpers import sft_config
from tunelab.data.collate import pad_batch
from tunelab.data.dataset import prepare_data
from tunelab.logprobs import model_lm_loss_sum
from tunelab.training.metrics import read_metrics


def losses(output_dir):
    return [row["loss"] for row in read_metrics(output_dir)]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_full_finetuning_loss_falls_and_final_loads(tiny_model_dirs, instruction_data, tmp_path, arch):
    train_file, eval_file = instruction_data
    config = sft_config(
        tiny_model_dirs[arch], train_file, tmp_path / "run", "train.max_steps=25", eval_file=eval_file
    )
    summary = tunelab.train(config)
    history = losses(tmp_path / "run")
    assert len(history) == 25 and all("step" in r and "loss" in r for r in read_metrics(tmp_path / "run"))
    assert sum(history[-5:]) / 5 < 0.8 * sum(history[:5]) / 5
    assert "eval_loss" in summary and "exact_match" in summary
    assert (tmp_path / "run" / "loss.png").exists()
    final = tmp_path / "run" / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    ids = tokenizer("### Instruction:\nWhat is 2 plus 3?\n\n### Response:\n", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids.shape[1]


def test_partial_trains_only_chosen_layers(tiny_model_dirs, instruction_data, tmp_path):
    model_dir = tiny_model_dirs["llama"]
    method = {"name": "partial", "last_layers": 1, "modules": ["lm_head"]}
    tunelab.train(sft_config(model_dir, instruction_data[0], tmp_path / "run", method=method))
    before = load_file(model_dir / "model.safetensors")
    after = load_file(tmp_path / "run" / "final" / "model.safetensors")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    should_train = {n for n in before if n.startswith("model.layers.1.") or n.startswith("lm_head.")}
    assert changed == should_train


def test_prompt_tokens_carry_no_loss(tiny_model_dirs, instruction_data, tmp_path):
    """The loss equals a hand-computed cross-entropy over response tokens only, and changing a
    prompt label (kept at -100) leaves it unchanged."""
    config = sft_config(tiny_model_dirs["llama"], instruction_data[0], tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["llama"])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"])
    data = prepare_data(config.data, tokenizer)
    batch = pad_batch(data.train.examples[:4], tokenizer.pad_token_id)
    ours = model_lm_loss_sum(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    manual = 0.0
    for b in range(4):
        example = data.train.examples[b]
        for t in range(1, len(example.input_ids)):
            if example.labels[t] != -100:
                manual += -torch.log_softmax(logits[b, t - 1], -1)[example.input_ids[t]]
    assert torch.allclose(ours, manual, rtol=1e-5)
    first_response = next(t for t, label in enumerate(data.train.examples[0].labels) if label != -100)
    assert first_response > 5


def test_accumulation_invariance(tiny_model_dirs, instruction_data, tmp_path):
    """batch 8 x accumulation 1 takes the same steps as batch 1 x accumulation 8."""
    model_dir, train_file = tiny_model_dirs["llama"], instruction_data[0]
    tunelab.train(
        sft_config(model_dir, train_file, tmp_path / "a", "train.batch_size=8", "train.grad_accum=1")
    )
    tunelab.train(
        sft_config(model_dir, train_file, tmp_path / "b", "train.batch_size=1", "train.grad_accum=8")
    )
    # Both layouts cut the same seeded permutation, so step k sees the same 8 examples in both;
    # only padding and summation order differ.
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(a) == len(b) == 6
    assert a == pytest.approx(b, rel=1e-4)


def test_resume_equals_no_stop(tiny_model_dirs, instruction_data, tmp_path):
    model_dir, train_file = tiny_model_dirs["llama"], instruction_data[0]
    common = ["train.max_steps=8", "train.save_every=4", "train.lr=1e-3"]
    tunelab.train(sft_config(model_dir, train_file, tmp_path / "full", *common))
    straight = losses(tmp_path / "full")
    # The same run, stopped after step 5 (checkpoint at 4), then resumed.
    with pytest.raises(KeyboardInterrupt):
        interrupt_after(5, sft_config(model_dir, train_file, tmp_path / "cut", *common))
    assert (tmp_path / "cut" / "checkpoints" / "step-4").is_dir()
    tunelab.train(sft_config(model_dir, train_file, tmp_path / "cut", *common, "train.resume=true"))
    resumed = losses(tmp_path / "cut")
    assert [r["step"] for r in read_metrics(tmp_path / "cut")] == list(range(1, 9))
    assert resumed == pytest.approx(straight, rel=1e-6)
    state = json.loads((tmp_path / "cut" / "checkpoints" / "step-4" / "state.json").read_text())
    assert state["step"] == 4 and state["data_position"] == 4


def test_a_run_resumed_at_its_last_step_reports_its_last_loss(tiny_model_dirs, instruction_data, tmp_path):
    """Stopped by a signal during its last step (a checkpoint there, no final/), a run resumed runs
    no step: its summary's final_train_loss is still the last logged loss, not None."""
    import os
    import signal

    from tunelab.errors import Preempted
    from tunelab.training import loop

    model_dir, train_file = tiny_model_dirs["llama"], instruction_data[0]
    common = ["train.max_steps=3", "train.lr=1e-3", "eval.generate=false"]
    original = loop.MetricsLog.log

    def log(self, row):  # SIGUSR1 as step 3 logs: the loop checkpoints step 3 and stops
        original(self, row)
        if row["step"] == 3:
            os.kill(os.getpid(), signal.SIGUSR1)

    loop.MetricsLog.log = log
    try:
        with pytest.raises(Preempted):
            tunelab.train(sft_config(model_dir, train_file, tmp_path / "run", *common))
    finally:
        loop.MetricsLog.log = original
    assert (tmp_path / "run" / "checkpoints" / "step-3").is_dir()
    summary = tunelab.train(sft_config(model_dir, train_file, tmp_path / "run", *common, "train.resume=true"))
    assert summary["steps"] == 3 and [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]
    assert summary["final_train_loss"] == losses(tmp_path / "run")[-1]


def test_resume_with_dropout_draws_the_same_masks(tiny_model_dirs, instruction_data, tmp_path):
    """LoRA dropout draws random numbers every step: a run resumed from its step-2 checkpoint logs
    the losses of the run that never stopped only if the checkpoint's RNG state is restored (a
    resumed process starts from the seed and would draw other masks)."""
    model_dir, train_file = tiny_model_dirs["llama"], instruction_data[0]
    method = {"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear", "dropout": 0.5}
    common = ["train.max_steps=4", "train.save_every=2", "train.batch_size=4"]
    tunelab.train(sft_config(model_dir, train_file, tmp_path / "full", *common, method=method))
    straight = losses(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        interrupt_after(3, sft_config(model_dir, train_file, tmp_path / "cut", *common, method=method))
    resumed = ["train.resume=true", *common]
    tunelab.train(sft_config(model_dir, train_file, tmp_path / "cut", *resumed, method=method))
    assert [r["step"] for r in read_metrics(tmp_path / "cut")] == [1, 2, 3, 4]
    assert losses(tmp_path / "cut") == pytest.approx(straight, rel=1e-6)


def interrupt_after(step: int, config):
    """Run `config` and raise KeyboardInterrupt once `step` metrics rows exist."""
    from tunelab.training import loop

    original = loop.MetricsLog.log

    def log(self, row):
        original(self, row)
        if row["step"] >= step:
            raise KeyboardInterrupt

    loop.MetricsLog.log = log
    try:
        tunelab.train(config)
    finally:
        loop.MetricsLog.log = original

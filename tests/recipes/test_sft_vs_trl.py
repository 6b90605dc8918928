"""A whole SFT run against TRL's `SFTTrainer` (with PEFT for LoRA), an independent implementation of
the same training: the same tokens, then step for step the same losses and, at the end, the same
weights, in float32. Every batch holds all the records, so the two trainers' data orders cannot
differ; what is compared is everything else: loss masking and normalisation over target tokens,
padded (TRL) against packed (tunelab) rows, the linear schedule, AdamW, gradient clipping at 1.0
and, for LoRA, PEFT's adapter format: both start from the same randomised adapter (A and B
random, so that no update hides behind a zero B), which tunelab continues as an earlier run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import tunelab
from tests.helpers import sft_config
from tunelab.data.dataset import prepare_data
from tunelab.training.metrics import read_metrics

trl = pytest.importorskip("trl")

RECORDS = [
    {"prompt": f"Question {i}: what is {i} plus {i + 2}?\nAnswer:", "completion": f" {2 * i + 2} is the sum."}
    for i in range(8)
]
STEPS = 4
LR = {"full": 2e-3, "lora": 2e-2}


def random_adapter(model_dir, folder):
    """A PEFT LoRA adapter on `model_dir` (r 4, alpha 8, q_proj and v_proj) with A and B random,
    saved in `folder`: the common start of both trainers."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.05)
    model.save_pretrained(folder)
    return folder


def trl_run(model_dir, method: str, out, adapter=None):
    """TRL's SFTTrainer on `RECORDS`: batch 8 (every record), `STEPS` steps, linear schedule, no
    warmup, float32, no gradient checkpointing; LoRA continues the PEFT `adapter`. Returns
    (trainer, per-step losses)."""
    from datasets import Dataset
    from peft import PeftModel
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if method == "lora":
        model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
    args = SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=8,
        max_steps=STEPS,
        learning_rate=LR[method],
        lr_scheduler_type="linear",
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        max_length=64,
        seed=0,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(RECORDS),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return trainer, losses


@pytest.fixture
def records_file(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def tunelab_config(model_dir, records_file, out, method, adapter=None):
    """tunelab on the same records: plain template (prompt, then completion and EOS, as TRL), packed
    rows, linear schedule; LoRA continues the PEFT `adapter` (an earlier run's adapter)."""
    lora = {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "dropout": 0.0}
    overrides = [f"train.max_steps={STEPS}", f"train.lr={LR[method]}", "train.schedule=linear"]
    overrides += ["data.template=plain", "data.packing=true"]
    if method == "lora":
        overrides += ["model.earlier_adapter=continue"]
        model_dir = adapter
    return sft_config(model_dir, records_file, out, *overrides, method=lora if method == "lora" else None)


def test_the_same_tokens_as_trl(llama_dir, records_file, tmp_path):
    trainer, _ = trl_run(llama_dir, "full", tmp_path / "trl")
    config = tunelab_config(llama_dir, records_file, tmp_path / "tl", "full")
    examples = prepare_data(config.data, AutoTokenizer.from_pretrained(llama_dir), seed=0).train.examples
    rows = trainer.train_dataset
    for example, row in zip(examples, rows, strict=True):
        assert list(example.input_ids) == row["input_ids"]
        assert list(example.labels) == row["labels"]  # the token's id where it carries loss, else -100


@pytest.mark.parametrize("method", ["full", "lora"])
def test_losses_and_weights_equal_trl(llama_dir, records_file, tmp_path, method):
    adapter = random_adapter(llama_dir, tmp_path / "start") if method == "lora" else None
    trainer, trl_losses = trl_run(llama_dir, method, tmp_path / "trl", adapter)
    tunelab.train(tunelab_config(llama_dir, records_file, tmp_path / "tl", method, adapter))
    ours = [row["loss"] for row in read_metrics(tmp_path / "tl")]
    assert ours == pytest.approx(trl_losses, rel=1e-5)
    assert ours[-1] < ours[0] - 0.1  # the runs learned something, so equal losses mean something
    if method == "full":
        theirs = {name: p.detach() for name, p in trainer.model.named_parameters()}
        mine = load_file(tmp_path / "tl" / "final" / "model.safetensors")
    else:
        trainer.model.save_pretrained(tmp_path / "trl-adapter")
        theirs = load_file(tmp_path / "trl-adapter" / "adapter_model.safetensors")
        mine = load_file(tmp_path / "tl" / "final" / "adapter_model.safetensors")
    assert set(mine) <= set(theirs) and len(mine) > 0
    for name, value in mine.items():
        torch.testing.assert_close(value, theirs[name], atol=2e-5, rtol=1e-4, msg=name)

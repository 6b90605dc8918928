"""Samples while training (`eval.sample_prompts`): answers at every evaluation in `samples.jsonl`."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tunelab
from tests.helpers import sft_config
from tunelab.training.metrics import read_metrics, read_samples

PROMPTS = ["What is 2 plus 3?", "Reverse the words: red owl sun"]


def test_samples_at_every_evaluation_are_the_models_greedy_answers(llama_dir, instruction_data, tmp_path):
    """Evaluations at steps 2 and 4 (eval_every=2, 4 steps): each writes one row per prompt, in
    order, and nothing of them enters metrics.jsonl. The last ones (step 4: the trained model)
    equal what transformers' own greedy `generate` answers from `final/` to the prompt rendered by
    hand in the alpaca template, cut at the first EOS."""
    train_file, eval_file = instruction_data
    out = tmp_path / "run"
    config = sft_config(
        llama_dir,
        train_file,
        out,
        "train.max_steps=4",
        "train.lr=3e-4",
        "train.eval_every=2",
        "eval.max_new_tokens=6",
        f"eval.sample_prompts={PROMPTS}",
        eval_file=eval_file,
    )
    tunelab.train(config)
    samples = read_samples(out)
    assert [(s["step"], s["prompt"]) for s in samples] == [
        (2, PROMPTS[0]),
        (2, PROMPTS[1]),
        (4, PROMPTS[0]),
        (4, PROMPTS[1]),
    ]
    assert all(set(s) == {"step", "prompt", "completion"} for s in samples)
    assert all(
        s["completion"] for s in samples
    )  # the barely trained model says something: a real check below
    assert all("samples" not in row for row in read_metrics(out))
    assert {row["step"] for row in read_metrics(out) if "eval_loss" in row} == {2, 4}

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    for sample in samples[2:]:
        text = f"### Instruction:\n{sample['prompt']}\n\n### Response:\n"
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            new = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)[
                0, ids.shape[1] :
            ]
        eos = (new == tokenizer.eos_token_id).nonzero()
        new = new[: int(eos[0])] if len(eos) else new
        assert sample["completion"] == tokenizer.decode(new, skip_special_tokens=True)


def test_samples_without_eval_data_and_none_by_default(llama_dir, instruction_data, tmp_path):
    """Sample prompts alone make the evaluations (no held-out data): samples, no eval_loss. Without
    sample prompts no samples.jsonl is written, and a new run in the folder removes an old one."""
    train_file, _ = instruction_data
    out = tmp_path / "run"
    common = ["train.max_steps=2", "train.eval_every=1", "eval.max_new_tokens=3"]
    tunelab.train(sft_config(llama_dir, train_file, out, *common, f"eval.sample_prompts={PROMPTS[:1]}"))
    assert [(s["step"], s["prompt"]) for s in read_samples(out)] == [(1, PROMPTS[0]), (2, PROMPTS[0])]
    assert all("eval_loss" not in row for row in read_metrics(out))
    tunelab.train(sft_config(llama_dir, train_file, out, *common))
    assert not (out / "samples.jsonl").exists()

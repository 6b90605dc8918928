"""Supervised fine-tuning (instruction tuning, chat, continued pre-training).

    L = - (1 / N) sum_{target tokens t} log p_theta(y_t | y_<t)

over the response tokens (all tokens with `data.train_on_prompt`, or for raw text), N = target
tokens in the optimizer step. The recipe: load data -> set up model and method -> evaluate ->
train -> evaluate -> save `final/`.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.config import RunConfig
from tunelab.data.collate import batch_stream, count_targets, pad_batch, to_device
from tunelab.data.dataset import prepare_data
from tunelab.data.packing import pack_batch
from tunelab.data.packing import real_tokens as count_real_tokens
from tunelab.evaluate import evaluate_loss, exact_match
from tunelab.kernels import cpu_attention
from tunelab.kernels.packed_attention import PACKED_ATTENTION, use_packed_attention
from tunelab.logprobs import model_lm_loss_sum
from tunelab.methods import count_parameters
from tunelab.training.loop import optimize, total_steps
from tunelab.training.setup import report_data, save_final, setup_run, write_summary


@dataclass
class Options:
    """Supervised fine-tuning has no options of its own; see `data` and `train`."""


def run(config: RunConfig) -> dict:
    """Train a model with the SFT objective; returns the summary written to `summary.json`."""
    cfg = config
    run_ = setup_run(cfg)
    tokenizer, model = run_.tokenizer, run_.model
    data = prepare_data(cfg.data, tokenizer, seed=cfg.train.seed)
    eval_count = len(data.eval.examples) if data.eval else 0
    details = f"format {data.format}, template {data.template}"
    report_data(run_, len(data.train.examples), eval_count, "examples", details, data.notes)

    if cfg.data.packing:
        attention = use_packed_attention(model, native=cfg.data.native_attention)
        if attention == PACKED_ATTENTION and run_.device.type == "cpu":
            kernel = (
                "C++ kernel" if cpu_attention.build() else "SDPA per example: the C++ kernel did not build"
            )
            attention = f"{attention} ({kernel})"
        run_.print(f"[tunelab] packing: one padding-free row per micro-batch, {attention} attention")
    train_examples = data.train.examples
    lengths = [len(e.input_ids) for e in train_examples]
    pad_id = tokenizer.pad_token_id

    def make_batches(position: int):
        for indices in batch_stream(
            lengths, run_.global_batch, cfg.train.seed, position, cfg.data.group_by_length
        ):
            examples = [train_examples[i] for i in run_.dist.shard(indices)]
            batch = pack_batch(examples) if cfg.data.packing else pad_batch(examples, pad_id)
            yield to_device(batch, run_.device)

    def loss_fn(batch):
        return model_lm_loss_sum(model, batch, cfg.train.loss_chunk_size, cfg.train.chunked_loss), {}

    def units(batch):
        return count_targets(batch["labels"])

    def real_tokens(batch):
        return count_real_tokens(batch)

    def evaluate():
        return evaluate_loss(
            model, data.eval.examples, pad_id, cfg.train.batch_size, cfg.train.eval_batches, run_.autocast()
        )

    steps = total_steps(run_, -(-len(train_examples) // run_.global_batch))
    result = optimize(run_, make_batches, loss_fn, units, steps, evaluate if data.eval else None, real_tokens)

    trainable, total = count_parameters(model)
    summary = {
        "steps": result.steps,
        "final_train_loss": result.final_loss,
        "trainable_params": trainable,
        "all_params": total,
    }
    if data.eval:
        summary.update(evaluate())
        if cfg.eval.generate and data.format in ("instruction", "chat", "prompt_completion"):
            accuracy, _ = exact_match(
                model,
                tokenizer,
                data.eval.conversations,
                data.template,
                cfg.eval.max_new_tokens,
                cfg.eval.batch_size,
                cfg.eval.num_examples,
            )
            summary["exact_match"] = accuracy
    final = save_final(run_)
    summary["final_dir"] = str(final)
    return write_summary(run_, summary)

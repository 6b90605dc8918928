"""Supervised fine-tuning (instruction tuning, chat, continued pre-training).

    L = - (1 / N) sum_{target tokens t} log p_theta(y_t | y_<t)

over the response tokens (all tokens with `data.train_on_prompt`, or for raw text), N = target
tokens in the optimizer step. The recipe: load data -> set up model and method -> evaluate ->
train -> evaluate -> save `final/`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from tunelab.config import RunConfig
from tunelab.data.collate import batch_stream, count_targets, pad_batch
from tunelab.data.dataset import prepare_data
from tunelab.evaluate import evaluate_loss, exact_match, model_lm_loss_sum
from tunelab.training.loop import optimize, total_steps
from tunelab.training.setup import save_final, setup_run


@dataclass
class Options:
    """Supervised fine-tuning has no options of its own; see `data` and `train`."""


def run(config: RunConfig) -> dict:
    """Train a model with the SFT objective; returns the summary written to `summary.json`."""
    cfg = config
    run_ = setup_run(cfg)
    tokenizer, model = run_.tokenizer, run_.model
    data = prepare_data(cfg.data, tokenizer, seed=cfg.train.seed)
    run_.print(
        f"[tunelab] data: {len(data.train.examples)} train / {len(data.eval.examples) if data.eval else 0} eval "
        f"examples, format {data.format}, template {data.template}"
    )
    for note in data.notes:
        run_.print(f"[tunelab] data: {note}")

    train_examples = data.train.examples
    lengths = [len(e.input_ids) for e in train_examples]
    pad_id = tokenizer.pad_token_id

    def make_batches(position: int):
        for indices in batch_stream(
            lengths, cfg.train.batch_size, cfg.train.seed, position, cfg.data.group_by_length
        ):
            batch = pad_batch([train_examples[i] for i in indices], pad_id)
            yield {k: v.to(run_.device) for k, v in batch.items()}

    def loss_fn(batch):
        return model_lm_loss_sum(model, batch, cfg.train.loss_chunk_size), {}

    def units(batch):
        return count_targets(batch["labels"])

    def real_tokens(batch):
        return int(batch["attention_mask"].sum())

    def evaluate():
        return evaluate_loss(
            model, data.eval.examples, pad_id, cfg.train.batch_size, cfg.train.eval_batches, run_.autocast()
        )

    steps = total_steps(run_, -(-len(train_examples) // cfg.train.batch_size))
    result = optimize(run_, make_batches, loss_fn, units, steps, evaluate if data.eval else None, real_tokens)

    summary = {"steps": result.steps, "final_train_loss": result.final_loss}
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
    if run_.is_main:
        (run_.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        run_.print(
            "[tunelab] "
            + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items())
        )
    return summary

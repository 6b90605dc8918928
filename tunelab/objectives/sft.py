"""Supervised fine-tuning (instruction tuning, chat, continued pre-training).

    L = - (1 / N) sum_{target tokens t} log p_theta(y_t | y_<t)

over the response tokens (all tokens with `data.train_on_prompt`, or for raw text), N = target
tokens in the optimizer step. The recipe: load data -> set up model and method -> train ->
evaluate -> save `final/`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch

from tunelab.config import RunConfig
from tunelab.data.collate import batch_stream, count_targets, example_lengths, pad_batch, to_device
from tunelab.data.dataset import prepare_data
from tunelab.data.packing import pack_batch, real_tokens
from tunelab.data.tokenize import TokenizedExample
from tunelab.evaluate import evaluate_loss, exact_match
from tunelab.kernels import cpu_attention
from tunelab.kernels.packed_attention import PACKED_ATTENTION, use_packed_attention
from tunelab.logprobs import model_lm_loss_sum
from tunelab.methods import count_parameters
from tunelab.samples import with_samples
from tunelab.trained import start_tokenizer
from tunelab.training.loop import MicroBatch, StepLoop, accumulated_step, resume, total_steps
from tunelab.training.optim import build_optimizer
from tunelab.training.setup import Run, report_data, save_final, setup_run, write_summary


@dataclass
class Options:
    """Supervised fine-tuning has no options of its own; see `data` and `train`."""


def run(config: RunConfig) -> dict:
    """Train a model with the SFT objective; returns the summary written to `summary.json`."""
    # Set-up: the data, the model with its method, the optimizer.
    cfg = config.train
    tokenizer = start_tokenizer(config)
    data = prepare_data(config.data, tokenizer, seed=cfg.seed)  # every record checked before the model loads
    run = setup_run(config, tokenizer)
    model = run.model
    eval_count = len(data.eval.examples) if data.eval else 0
    details = f"format {data.format}, template {data.template}"
    report_data(run, len(data.train.examples), eval_count, "examples", details, data.notes)
    if config.data.packing:
        attention = packed_attention(run)
        run.print(f"[tunelab] packing: one padding-free row per micro-batch, {attention} attention")
    evaluate = partial(held_out_loss, run, data.eval.examples) if data.eval else None
    evaluate = with_samples(run, evaluate, data.template)  # answers to eval.sample_prompts too
    steps = total_steps(run, -(-len(data.train.examples) // run.global_batch))
    run.dist.wrap(model)  # DDP or FSDP2 under torchrun (before the optimizer sees the parameters)
    optimizer = build_optimizer(model, cfg)
    start = resume(run, optimizer)
    batches = sft_batches(run, data.train.examples, position=start * cfg.grad_accum)

    # The loop: one optimizer step per `grad_accum` micro-batches.
    loop = StepLoop(run, optimizer, steps, start, evaluate)
    with loop.running():
        for step in loop.step_numbers():
            micro_batches = [next(batches) for _ in range(cfg.grad_accum)]
            figures = accumulated_step(run, optimizer, micro_batches, partial(sft_loss, run))
            loop.end_step(step, figures, data_position=step * cfg.grad_accum)

    # The end: `final/` first, then the held-out figures and `summary.json`.
    final = save_final(run)
    trainable, total = count_parameters(model)
    summary = {
        "steps": steps,
        "final_train_loss": loop.result().final_loss,
        "trainable_params": trainable,
        "all_params": total,
    }
    if data.eval:
        summary.update(held_out_loss(run, data.eval.examples))
        if config.eval.generate and data.format in ("instruction", "chat", "prompt_completion"):
            summary["exact_match"] = held_out_exact_match(run, data.eval.conversations, data.template)
    return write_summary(run, summary, final)


def packed_attention(run: Run) -> str:
    """Switch the model to attention within packed examples; returns what it now uses (on CPU, with
    the C++ kernel built now rather than in the first step)."""
    attention = use_packed_attention(run.model, native=run.config.data.native_attention)
    if attention == PACKED_ATTENTION and run.device.type == "cpu":
        built = cpu_attention.build()
        attention += " (C++ kernel)" if built else " (SDPA per example: the C++ kernel did not build)"
    return attention


def sft_batches(run: Run, examples: list[TokenizedExample], position: int) -> Iterator[MicroBatch]:
    """This process's micro-batches of the seeded training order, from micro-batch `position` on:
    packed into one row (`data.packing`) or padded; units = target tokens."""
    config = run.config
    lengths = example_lengths(examples)
    pad_id = run.tokenizer.pad_token_id
    order = batch_stream(lengths, run.global_batch, config.train.seed, position, config.data.group_by_length)
    for indices in order:
        mine = run.dist.shard(indices)
        chosen = [examples[i] for i in mine]
        batch = pack_batch(chosen) if config.data.packing else pad_batch(chosen, pad_id)
        yield MicroBatch(
            to_device(batch, run.device), count_targets(batch["labels"]), real_tokens(batch), mine
        )


def sft_loss(run: Run, tensors: dict) -> tuple[torch.Tensor, dict]:
    """The summed next-token loss of a micro-batch (`tunelab.logprobs.model_lm_loss_sum`); no extras."""
    cfg = run.config.train
    return model_lm_loss_sum(run.model, tensors, cfg.loss_chunk_size, cfg.chunked_loss), {}


def held_out_loss(run: Run, examples: list[TokenizedExample]) -> dict:
    """Per-token loss and perplexity on the held-out examples (up to `train.eval_batches` batches)."""
    cfg = run.config.train
    return evaluate_loss(
        run.model, examples, run.tokenizer.pad_token_id, cfg.batch_size, cfg.eval_batches, run.autocast()
    )


def held_out_exact_match(run: Run, conversations: list, template: str) -> float:
    """Exact-match accuracy of greedy answers to the held-out prompts (`eval.*` settings)."""
    cfg = run.config.eval
    accuracy, _ = exact_match(
        run.model,
        run.tokenizer,
        conversations,
        template,
        cfg.max_new_tokens,
        cfg.batch_size,
        cfg.num_examples,
    )
    return accuracy

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
import yaml

from tunelab.config import RunConfig
from tunelab.data.collate import (
    batch_stream,
    count_targets,
    example_lengths,
    pad_batch,
    split_by_tokens,
    to_device,
)
from tunelab.data.dataset import prepare_data
from tunelab.data.packing import pack_batch, real_tokens
from tunelab.data.tokenize import TokenizedExample
from tunelab.errors import TunelabError
from tunelab.evaluate import evaluate_loss, exact_match
from tunelab.kernels import cpu_attention
from tunelab.kernels.packed_attention import PACKED_ATTENTION, unpackable_attention, use_packed_attention
from tunelab.logprobs import model_lm_loss_sum
from tunelab.methods import count_parameters
from tunelab.samples import with_samples
from tunelab.trained import start_tokenizer
from tunelab.training.distributed import Parallel
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
    unpacked_fallback(run)
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
            micro_batches = [part for _ in range(cfg.grad_accum) for part in next(batches)]
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


def unpacked_fallback(run: Run) -> None:
    """`data.packing: auto` resolved to true, but the model cannot attend within packed examples:
    turn packing off (in the run's config.yaml too) and say why in one line. An explicit `true`
    keeps the error `tunelab.kernels.packed_attention` raises."""
    config, model = run.config, run.model
    if not config.data.packing or "data.packing" not in config.auto_keys:
        return
    windows = [
        m.sliding_window for m in model.modules() if isinstance(getattr(m, "sliding_window", None), int)
    ]
    problem = unpackable_attention(model)
    if problem:
        problem = f"packed attention {problem}"
    elif windows and min(windows) < config.data.max_length:
        problem = f"packed attention has no sliding window, and the model's {min(windows)} < data.max_length"
    else:
        return
    run.print(f"[tunelab] data.packing auto -> false: {problem}; rows are padded")
    config.data.packing = False
    run.config_yaml = yaml.safe_dump(config.to_dict(), sort_keys=False)


def packed_attention(run: Run) -> str:
    """Switch the model to attention within packed examples; returns what it now uses (on CPU, with
    the C++ kernel built now rather than in the first step)."""
    attention = use_packed_attention(run.model, native=run.config.data.native_attention)
    if attention == PACKED_ATTENTION and run.device.type == "cpu":
        built = cpu_attention.build()
        attention += " (C++ kernel)" if built else " (SDPA per example: the C++ kernel did not build)"
    return attention


def sft_batches(run: Run, examples: list[TokenizedExample], position: int) -> Iterator[list[MicroBatch]]:
    """This process's micro-batches of the seeded training order, from micro-batch `position` on:
    packed into one row (`data.packing`) or padded; units = target tokens. Each micro-batch comes as
    the list of its forward passes: one, or with `train.max_micro_batch_tokens` its sub-batches
    (`budget_parts`), which the step runs one after the other (the same step: `accumulated_step`
    normalises by the target tokens of all of them)."""
    config = run.config
    lengths = example_lengths(examples)
    pad_id = run.tokenizer.pad_token_id
    order = batch_stream(lengths, run.global_batch, config.train.seed, position, config.data.group_by_length)
    for indices in order:
        parts = []
        for mine in budget_parts(run, indices, lengths):
            chosen = [examples[i] for i in mine]
            batch = pack_batch(chosen) if config.data.packing else pad_batch(chosen, pad_id)
            tensors = to_device(batch, run.device)
            parts.append(MicroBatch(tensors, count_targets(batch["labels"]), real_tokens(batch), mine))
        yield parts


def budget_parts(run: Run, indices: list[int], lengths: list[int]) -> list[list[int]]:
    """This process's rows of the global micro-batch `indices`, as the example lists of its forward
    passes: all in one, or split to fit `train.max_micro_batch_tokens` (`split_by_tokens`). Under
    torchrun every rank runs the same number of passes (forward passes are collective under FSDP,
    and DDP broadcasts buffers in each): the most any rank's rows need, which every rank knows from
    the global batch; a rank whose rows fit in fewer halves its largest parts."""
    budget = run.config.train.max_micro_batch_tokens
    mine = run.dist.shard(indices)
    if budget is None:
        return [mine]
    packed = run.config.data.packing
    world = run.dist.world_size
    shards = [Parallel(rank=rank, world_size=world).shard(indices) for rank in range(world)]
    count = max(len(split_by_tokens([lengths[i] for i in shard], budget, packed)) for shard in shards)
    groups = split_by_tokens([lengths[i] for i in mine], budget, packed, parts=count)
    if groups is None:
        raise TunelabError(
            f"train.max_micro_batch_tokens={budget} splits another process's rows into {count} passes, "
            f"and this one has only {len(mine)} rows; raise it to at least 2 x data.max_length"
        )
    return [[mine[j] for j in group] for group in groups]


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

"""Evaluation: loss and perplexity on held-out examples, and exact-match accuracy of greedy
generations against reference responses.

    eval_loss  = sum of token losses / number of target tokens       (per-token cross-entropy)
    perplexity = exp(eval_loss)
    exact match = mean over records of [strip(generated) == strip(reference)]

where `generated` is the greedy response up to its first EOS (the tokenizer's or the generation
config's; `tunelab.generation`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunelab.data.collate import count_targets, pad_batch
from tunelab.data.dataset import prompt_and_reference
from tunelab.data.formats import Conversation
from tunelab.data.tokenize import TokenizedExample
from tunelab.generation import generate, mixed_precision
from tunelab.logprobs import model_lm_loss_sum


@torch.no_grad()
def evaluate_loss(
    model: PreTrainedModel,
    examples: list[TokenizedExample],
    pad_id: int,
    batch_size: int = 8,
    max_batches: int | None = None,
    autocast=None,
) -> dict:
    """Per-token eval loss and perplexity over `examples` (optionally the first `max_batches`), under
    `autocast` (a run's) or else the model's own precision (`tunelab.generation.mixed_precision`)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    starts = range(0, len(examples), batch_size)
    for index, start in enumerate(starts):
        if max_batches is not None and index >= max_batches:
            break
        batch = {k: v.to(device) for k, v in pad_batch(examples[start : start + batch_size], pad_id).items()}
        with autocast or mixed_precision(model):
            total += float(model_lm_loss_sum(model, batch))
        count += count_targets(batch["labels"])
    model.train(was_training)
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


@dataclass
class Generation:
    prompt: str
    reference: str
    output: str

    @property
    def correct(self) -> bool:
        return self.output.strip() == self.reference.strip()


def generate_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    max_new_tokens: int = 64,
    batch_size: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> list[str]:
    """The text of a response to each tokenised prompt (greedy unless `do_sample`), cut at the
    first EOS (`tunelab.generation`)."""
    options = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {"do_sample": False}
    )
    return generate(model, tokenizer, prompts, max_new_tokens, batch_size, options).texts


def exact_match(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[Conversation],
    template: str,
    max_new_tokens: int = 64,
    batch_size: int = 32,
    limit: int | None = None,
) -> tuple[float, list[Generation]]:
    """Exact-match accuracy of greedy generations against each conversation's last assistant turn."""
    chosen = conversations[:limit] if limit is not None else conversations
    pairs = [prompt_and_reference(conv, tokenizer, template) for conv in chosen]
    outputs = generate_responses(model, tokenizer, [p for p, _ in pairs], max_new_tokens, batch_size)
    results = [
        Generation(tokenizer.decode(p, skip_special_tokens=False), ref, out)
        for (p, ref), out in zip(pairs, outputs, strict=True)
    ]
    accuracy = sum(r.correct for r in results) / max(len(results), 1)
    return accuracy, results

"""Generation: left-pad the prompts, generate, keep the new tokens, cut each response at its end.
Evaluation (`tunelab.evaluate`, `tunelab generate`) and RL rollouts (`tunelab.rl.rollouts`) both
generate through `generate`.

Prompts p_1 .. p_N (token ids, lengths L_n) are left-padded to P = max_n L_n,

    row n = [pad * (P - L_n) | p_n],     attention mask [0 * (P - L_n) | 1 * L_n],

so that every row's first new token comes at column P. A batch of rows b .. b + B - 1 drops the
columns that are padding in all of its rows (its width is the longest prompt of the batch), and
`model.generate` returns that width plus R_b new columns, R_b <= max_new_tokens. The batches'
new tokens are right-padded with the pad id to R = max_b R_b: the (N, R) response block.

Where a response ends. The end-of-sequence ids are one set for every caller,

    EOS = {tokenizer.eos_token_id} U {model.generation_config.eos_token_id (one id or a list)},

since chat models often end a turn with a token that the tokenizer does not call EOS (Llama 3's
`<|eot_id|>`, Qwen's `<|im_end|>`), and their generation config lists it. Generation stops a row
at its first EOS; the response is the tokens up to and including it (the whole R columns for a row
cut at max_new_tokens), and what follows it is padding. The response's text is the tokens before
the EOS, decoded with special tokens skipped.

Precision. A model of a `train.precision: bf16/fp16` run keeps its trainable parameters in float32
beside a bfloat16/float16 base (`tunelab.training.setup.prepare_model`), and training computes it
under autocast. Generation computes any model whose floating parameters are float32 and one half
dtype the same way, under autocast to the half dtype (`mixed_precision`), whoever calls (evaluation,
sample prompts, RL rollouts, the commands): a base-model layer trained in float32 (full or partial
fine-tuning, LoRA's `modules_to_save`, adapters' trained norms) would otherwise hand float32 hidden
states to the frozen half-precision layers after it. LoRA and adapter layers compute with half
inputs outside autocast too (a loaded adapter, a `train.precision: fp32` run on a half base); here
they also run under autocast. A model of one dtype runs as it is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

from tunelab.data.collate import left_pad


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends a response, sorted: the tokenizer's EOS and the generation config's."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if configured is not None:
        ids |= set(configured if isinstance(configured, list) else [configured])
    return sorted(ids)


def response_mask(tokens: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask (N, R) float, ended (N,) bool): 1 on each row's tokens up to and including its first
    EOS, or on the whole row where no EOS was generated (`ended` false)."""
    is_eos = torch.isin(tokens, torch.tensor(eos_ids, device=tokens.device))  # (N, R)
    ended = is_eos.any(dim=1)  # (N,)
    first = torch.where(
        ended, is_eos.float().argmax(dim=1), torch.full_like(ended, tokens.shape[1] - 1, dtype=torch.long)
    )  # (N,) column of the last response token
    positions = torch.arange(tokens.shape[1], device=tokens.device)  # (R,)
    return (positions[None, :] <= first[:, None]).float(), ended


@dataclass
class Responses:
    """One generated response per prompt (module docstring)."""

    prompt_ids: torch.Tensor
    """(N, P) the prompts, left-padded, on the model's device."""
    prompt_mask: torch.Tensor
    """(N, P) 1 on prompt tokens."""
    tokens: torch.Tensor
    """(N, R) the responses, right-padded: the pad id after each row's first EOS."""
    mask: torch.Tensor
    """(N, R) float: 1 on response tokens, the EOS included."""
    ended: torch.Tensor
    """(N,) bool: the response ends with an EOS (else it was cut at max_new_tokens)."""
    ids: list[list[int]]
    """Each response's token ids, the EOS included when one was generated."""
    texts: list[str]
    """Each response decoded without its EOS, special tokens skipped."""


def mixed_precision(model: torch.nn.Module):
    """The context a model computes in (module docstring): autocast to its half dtype when its
    floating parameters are float32 and one half dtype (float32 master weights beside a bfloat16 or
    float16 base) and no autocast is on already; else nothing."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    half = dtypes - {torch.float32}
    device = next(model.parameters()).device.type
    if torch.float32 not in dtypes or len(half) != 1 or torch.is_autocast_enabled(device):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=half.pop())


ProcessorFactory = Callable[[int, int, int], LogitsProcessor]
"""(first row, end row, prompt width of the batch) -> a logits processor for those rows."""


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int | None = None,
    options: dict | None = None,
    processor: ProcessorFactory | None = None,
) -> Responses:
    """Generate a response to each tokenised prompt, `batch_size` prompts a call (None: all in one).

    `options` are `model.generate` keywords that choose the tokens (`do_sample`, `temperature`,
    `top_p`, ...); `processor`, when given, makes each batch's logits processor (keyed sampling).
    The model runs in eval mode (under `mixed_precision`) and is put back in the mode it was in.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id, eos_ids = tokenizer.pad_token_id, eos_token_ids(model, tokenizer)
    padded = {k: v.to(device) for k, v in left_pad(prompts, pad_id).items()}  # each (N, P)
    full_width = padded["input_ids"].shape[1]
    step = batch_size or len(prompts)
    pieces = []
    for start in range(0, len(prompts), step):
        stop = min(start + step, len(prompts))
        width = max(len(p) for p in prompts[start:stop])  # the batch's columns: its longest prompt
        batch = {k: v[start:stop, full_width - width :] for k, v in padded.items()}  # each (B, width)
        extra = {}
        if processor is not None:
            extra["logits_processor"] = LogitsProcessorList([processor(start, stop, width)])
        with mixed_precision(model):
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
                eos_token_id=eos_ids,
                **(options or {}),
                **extra,
            )  # (B, width + R_b)
        pieces.append(out[:, width:])  # (B, R_b)
    model.train(was_training)
    length = max(p.shape[1] for p in pieces)
    tokens = torch.cat(
        [torch.nn.functional.pad(p, (0, length - p.shape[1]), value=pad_id) for p in pieces]
    )  # (N, R)
    mask, ended = response_mask(tokens, eos_ids)
    tokens = torch.where(mask.bool(), tokens, torch.full_like(tokens, pad_id))
    lengths = mask.sum(dim=1).long().tolist()
    ids = [row[:n].tolist() for row, n in zip(tokens, lengths, strict=True)]
    texts = tokenizer.batch_decode(
        [row[: len(row) - int(end)] for row, end in zip(ids, ended.tolist(), strict=True)],
        skip_special_tokens=True,
    )
    return Responses(padded["input_ids"], padded["attention_mask"], tokens, mask, ended, ids, texts)

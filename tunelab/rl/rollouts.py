"""Rollouts: sample responses to a batch of prompts, and lay them out for scoring and training.

Responses come from `tunelab.generation.generate` (left-padded prompts; a response ends at the first
of the tokenizer's and the generation config's EOS ids), sampled at temperature tau within the
nucleus top-p, at most `max_new_tokens`; no top-k and no repetition penalty, whatever the model's
generation config says, so the samples come from the tempered policy that PPO/GRPO score.
Each row of a rollout is

    [pad ... pad | prompt (P columns, left-padded) | response (R columns, right-padded)]

The response mask covers the tokens up to and including the first EOS; a response that ends without
EOS was cut at `max_new_tokens` (`ended` is false). Everything after the first EOS is padding. The
log-prob of response token j sits at column P + j of a `logprobs_from_hidden` result, and its value
(the state before emitting it) at column P + j - 1 of the hidden states.

Keyed sampling. Given a key k_i per row (the objectives use (seed, step, the row's place in the
global batch)), token j of row i is drawn by inverting the cumulative distribution with one
uniform number made by an integer hash of (k_i, j):

    p = softmax(z / tau)  (0 outside the top-p nucleus),   y_ij = min { v : sum_{w <= v} p_w >= u(k_i, j) }

an exact sample of p (Devroye 1986, "Non-Uniform Random Variate Generation", ch. 2). What
changes against `generate`'s sampler is that a row's response is a function of its key and of its
prompt alone, not of the other rows of the batch, their padding, the RNG's state or the number of
processes. So a run on W ranks x b prompts samples the responses of one process x W * b prompts,
and a resumed run the responses of the run that never stopped. It costs one softmax and one
cumulative sum over the vocabulary per token (no noise tensor of the vocabulary's size).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, PreTrainedModel, PreTrainedTokenizerBase

from tunelab.generation import generate


@dataclass
class Rollout:
    input_ids: torch.Tensor
    """(N, P + R): left-padded prompt, then the right-padded response."""
    attention_mask: torch.Tensor
    """(N, P + R)."""
    prompt_length: int
    """P, the prompt columns."""
    response_mask: torch.Tensor
    """(N, R) float: 1 on response tokens up to and including the first EOS."""
    ended: torch.Tensor
    """(N,) bool: the response ends with EOS (else it was cut at max_new_tokens)."""
    completions: list[str]
    """Decoded responses (without the EOS, special tokens skipped)."""
    completion_ids: list[list[int]]
    """Response token ids (the EOS included when generated)."""

    @property
    def target_mask(self) -> torch.Tensor:
        """(N, P + R): the response tokens, for `logprobs_from_hidden`."""
        prompt = torch.zeros_like(self.input_ids[:, : self.prompt_length], dtype=self.response_mask.dtype)
        return torch.cat([prompt, self.response_mask], dim=1)

    def rows(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask and target_mask of the rows in `index`."""
        return {
            "input_ids": self.input_ids[index],
            "attention_mask": self.attention_mask[index],
            "target_mask": self.target_mask[index],
        }


MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 tensors x < 2^32, without int64 overflow (16-bit halves of c)."""
    low = x * (c & 0xFFFF)  # < 2^48
    high = ((x * (c >> 16)) & 0xFFFF) << 16  # x * (c >> 16) < 2^48
    return (low + high) & MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixing function (xor-shift / multiply rounds, Wellons' "lowbias32"
    constants), element-wise on int64 tensors holding 32-bit values."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def sampling_keys(seed: int, step: int, positions: list[int]) -> torch.Tensor:
    """One 32-bit key per row from (seed, step, the row's position in the global batch): (N,) int64."""
    base = hash32(torch.tensor([seed & MASK32]))
    base = hash32(base ^ hash32(torch.tensor([step & MASK32])))
    return hash32(base ^ hash32(torch.tensor(positions, dtype=torch.long)))


class KeyedSampling(LogitsProcessor):
    """Inverse-CDF sampling keyed per row (module docstring), for `generate(do_sample=False)`: the
    returned scores are 0 at the sampled token and -inf elsewhere, so greedy decoding picks it."""

    def __init__(self, keys: torch.Tensor, prompt_width: int, temperature: float, top_p: float):
        self.keys = keys  # (N,) int64
        self.prompt_width = prompt_width
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.float() / self.temperature  # (N, V)
        if self.top_p < 1.0:
            logits = top_p_filter(logits, self.top_p)
        cdf = logits.softmax(dim=-1).double().cumsum(dim=-1)  # (N, V), float64: exact enough over 10^5 tokens
        token = input_ids.shape[1] - self.prompt_width  # index of the token being drawn
        keys = self.keys.to(logits.device)
        bits = hash32(keys ^ hash32(torch.full_like(keys, token)))  # (N,) uniform 32-bit
        uniform = (bits.double() + 0.5) / 2**32 * cdf[:, -1]  # (N,) in (0, total mass)
        choice = torch.searchsorted(cdf, uniform[:, None]).clamp(max=logits.shape[-1] - 1)  # (N, 1)
        return torch.full_like(logits, float("-inf")).scatter_(1, choice, 0.0)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """-inf outside the smallest set of tokens holding `top_p` of the probability (nucleus, Holtzman
    et al. 2020); the most likely token always stays. (N, V) -> (N, V)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)  # (N, V), descending
    drop = probs.cumsum(dim=-1) - probs >= top_p  # the mass before this token already reaches p
    drop[:, 0] = False
    dropped = torch.zeros_like(drop).scatter(1, order, drop)  # back to vocabulary order
    return logits.masked_fill(dropped, float("-inf"))


def generate_rollouts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    batch_size: int | None = None,
    keys: torch.Tensor | None = None,
) -> Rollout:
    """Sample (or, with `greedy`, decode greedily) one response per prompt; see the module docstring.
    `keys` (N,): keyed sampling, reproducible whatever the batch; None: `generate`'s own sampler."""
    options = {"repetition_penalty": 1.0, "use_cache": True}
    if greedy or keys is not None:
        options["do_sample"] = False
    else:
        options.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)

    def keyed(start: int, stop: int, width: int) -> KeyedSampling:
        return KeyedSampling(keys[start:stop], width, temperature, top_p)

    processor = keyed if keys is not None and not greedy else None
    out = generate(model, tokenizer, prompts, max_new_tokens, batch_size, options, processor)
    return Rollout(
        input_ids=torch.cat([out.prompt_ids, out.tokens], dim=1),
        attention_mask=torch.cat([out.prompt_mask, out.mask.long()], dim=1),
        prompt_length=out.prompt_ids.shape[1],
        response_mask=out.mask,
        ended=out.ended,
        completions=out.texts,
        completion_ids=out.ids,
    )


def prompt_columns(extras: list[dict]) -> dict[str, list]:
    """The prompt records' other fields as lists, for reward functions (a missing field gives None)."""
    keys = sorted({key for extra in extras for key in extra})
    return {key: [extra.get(key) for extra in extras] for key in keys}

"""Preference pairs (reward models, DPO) and prompt-only sets (PPO, GRPO): reading, checking, tokenising.

Preference records, in TRL's field names:

- plain text: `{"prompt": str, "chosen": str, "rejected": str}`;
- chat messages: `{"prompt": [messages], "chosen": [assistant messages], "rejected": [...]}`;
- implicit prompt: `{"chosen": [full conversation], "rejected": [full conversation]}`: the prompt is
  the messages both share at the start (trl-lib/ultrafeedback_binarized, Anthropic HH in TRL's form);
- optional `margin` (a number: a larger required reward gap for this pair, see losses/reward.py),
  and other fields kept for the template (`instruction` + `input` render alpaca's Input section).

Each response is rendered after the prompt with the run's template and tokenised like an SFT
example: `labels` are -100 on the prompt, the response tokens (and the template's EOS) are targets.

Prompt records: `{"prompt": str or [messages], ...}` (or `question`, as in openai/gsm8k); every other
field (e.g. `answer`) is kept and handed to reward functions. The prompt is rendered as a
generation prompt (up to where the assistant's answer starts).

A bad record is a `DataError` naming the file, the record (line) and the field, or is skipped and
counted with `data.skip_bad_records`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch
from transformers import PreTrainedTokenizerBase

from tunelab.config import DataConfig
from tunelab.data.collate import pad_batch
from tunelab.data.dataset import prompt_and_reference
from tunelab.data.formats import Conversation, _messages, require_text, to_conversation
from tunelab.data.mixture import as_sources, read_mixture, source_lines
from tunelab.data.splits import describe, eval_source
from tunelab.data.templates import choose_template, override_chat_template, render_segments
from tunelab.data.tokenize import TokenizedExample, adds_bos, encode_segments
from tunelab.errors import DataError

PROMPT_KEYS = ("prompt", "question")

Turns = list[tuple[str, str]]
Example = TypeVar("Example")


@dataclass
class PreferencePair:
    """A checked record: the prompt turns and the turns of each response."""

    prompt: Turns
    chosen: Turns
    rejected: Turns
    margin: float = 0.0
    extra: dict = field(default_factory=dict)

    def conversation(self, which: str) -> Conversation:
        """The prompt followed by the `chosen` or `rejected` response."""
        return Conversation(self.prompt + getattr(self, which), self.extra)


@dataclass
class PairExample:
    """A tokenised pair; both sides share the prompt tokens."""

    chosen: TokenizedExample
    rejected: TokenizedExample
    margin: float = 0.0

    @property
    def length(self) -> int:
        return max(len(self.chosen.input_ids), len(self.rejected.input_ids))


@dataclass
class PromptExample:
    """A tokenised generation prompt, the prompt as given (for reward functions) and the other fields."""

    prompt_ids: list[int]
    prompt: str | list
    extra: dict = field(default_factory=dict)


@dataclass
class PreparedExamples(Generic[Example]):
    """The tokenised training and held-out examples of a preference or prompt set, the template
    they were rendered with, and notes for the run's log."""

    train: list[Example]
    eval: list[Example] | None
    template: str
    notes: list[str] = field(default_factory=list)


PreferenceData = PreparedExamples[PairExample]
PromptData = PreparedExamples[PromptExample]


# ------------------------------------------------------------------ checking records


def _response_turns(value, source: str, number: int, key: str) -> Turns:
    if isinstance(value, str):
        require_text(value, source, number, key)
        return [("assistant", value)]
    turns = _messages(value, source, number, key)
    if turns[0][0] != "assistant":
        raise DataError(source, number, f"{key}[0].role", "a response must start with an assistant message")
    return turns


def to_preference_pair(
    record: dict, source: str, number: int, system_prompt: str | None = None
) -> PreferencePair:
    """Check a preference record and split it into prompt and responses (DataError if malformed):
    with a `prompt` field the responses are `chosen` and `rejected` as they are; without one,
    `chosen` and `rejected` are whole conversations and the prompt is their shared beginning."""
    for key in ("chosen", "rejected"):
        if key not in record or record[key] is None:
            raise DataError(source, number, key, "missing field")
        if not isinstance(record[key], (str, list)):
            raise DataError(
                source,
                number,
                key,
                f"expected a string or a list of messages, got {type(record[key]).__name__}",
            )
    chosen, rejected, prompt = record["chosen"], record["rejected"], record.get("prompt")
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise DataError(
            source, number, "rejected", "chosen and rejected must both be strings or both messages"
        )
    if prompt is None:
        prompt_turns, chosen_turns, rejected_turns = _split_shared_prompt(chosen, rejected, source, number)
    else:
        prompt_turns = _prompt_turns(prompt, source, number)
        chosen_turns = _response_turns(chosen, source, number, "chosen")
        rejected_turns = _response_turns(rejected, source, number, "rejected")
    if system_prompt and prompt_turns[0][0] != "system":
        prompt_turns = [("system", system_prompt)] + prompt_turns
    margin = record.get("margin", 0.0)
    if margin is None:
        margin = 0.0
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise DataError(source, number, "margin", f"expected a number, got {margin!r}")
    extra = {k: v for k, v in record.items() if k not in ("prompt", "chosen", "rejected", "margin")}
    return PreferencePair(prompt_turns, chosen_turns, rejected_turns, float(margin), extra)


def _prompt_turns(prompt, source: str, number: int) -> list[tuple[str, str]]:
    """A `prompt` field (a string: one user turn; or messages) as turns."""
    if isinstance(prompt, list):
        return _messages(prompt, source, number, "prompt")
    if isinstance(prompt, str):
        require_text(prompt, source, number, "prompt")
        return [("user", prompt)]
    raise DataError(source, number, "prompt", f"expected a string or messages, got {type(prompt).__name__}")


def _split_shared_prompt(chosen, rejected, source: str, number: int):
    """(prompt turns, chosen turns, rejected turns) of two whole conversations without a `prompt`
    field: the prompt is their longest shared beginning that ends before an assistant turn, and
    both answers must start with an assistant turn."""
    if isinstance(chosen, str):
        raise DataError(source, number, "prompt", "missing field (needed when chosen/rejected are strings)")
    chosen_turns = _messages(chosen, source, number, "chosen")
    rejected_turns = _messages(rejected, source, number, "rejected")
    shared = 0
    while (
        shared < min(len(chosen_turns), len(rejected_turns))
        and chosen_turns[shared] == rejected_turns[shared]
    ):
        shared += 1
    while shared > 0 and chosen_turns[shared - 1][0] == "assistant":
        shared -= 1  # the responses start at an assistant turn
    starts = [turns[shared][0] if shared < len(turns) else None for turns in (chosen_turns, rejected_turns)]
    if shared == 0 or starts != ["assistant", "assistant"]:
        raise DataError(
            source,
            number,
            "chosen",
            "cannot find the shared prompt: no shared leading messages before the answers",
        )
    return chosen_turns[:shared], chosen_turns[shared:], rejected_turns[shared:]


def to_prompt(
    record: dict, source: str, number: int, system_prompt: str | None = None
) -> tuple[str | list, Conversation]:
    """Check a prompt record: (the prompt as given, its `Conversation` with the other fields as extra)."""
    key = next((k for k in PROMPT_KEYS if record.get(k) is not None), None)
    if key is None:
        raise DataError(source, number, "prompt", "missing field (or question)")
    record = {"prompt": record[key], **{k: v for k, v in record.items() if k != key}}
    return record["prompt"], to_conversation(record, "prompt", source, number, system_prompt)


def _train_and_eval(
    cfg: DataConfig, expected_format: str, check, seed: int
) -> tuple[list, list | None, list[str]]:
    """Read and check the training records and the held-out ones, from one source or a mixture
    (`tunelab.data.mixture`)."""

    def make_check(src, name, number, first):
        if src.format not in ("auto", expected_format):
            problem = f"this objective reads {expected_format} records, but data.format is {src.format!r}"
            raise DataError(name, None, None, problem)
        return check, expected_format

    if not cfg.train:
        raise DataError("data.train", None, None, "no training data given")
    mixed = read_mixture(cfg, make_check, seed)
    skipped = mixed.skipped + mixed.eval_skipped
    notes = source_lines(as_sources(cfg.train, cfg, cfg.split), mixed.read, mixed.taken)
    notes += [f"skipped {skipped} bad records"] if skipped else []
    return mixed.train, mixed.eval, notes


# ------------------------------------------------------------------ preference pairs


def encode_pair(
    pair: PreferencePair, tokenizer: PreTrainedTokenizerBase, template: str, max_length: int
) -> PairExample | None:
    """Tokenise both sides; only the response turns are targets (assistant turns of the prompt are
    context). None when truncation leaves either response without a target token."""
    add_special = template != "chat" and adds_bos(tokenizer)
    in_prompt = sum(role == "assistant" for role, _ in pair.prompt)  # earlier assistant turns are context
    sides = []
    for which in ("chosen", "rejected"):
        segments, seen = [], 0
        for text, is_target in render_segments(pair.conversation(which), tokenizer, template):
            seen += is_target
            segments.append((text, is_target and seen > in_prompt))
        sides.append(encode_segments(segments, tokenizer, max_length, False, add_special))
    if any(side.num_targets == 0 for side in sides):
        return None
    return PairExample(sides[0], sides[1], pair.margin)


def _encode_pairs(
    pairs: list[PreferencePair], tokenizer, template: str, max_length: int
) -> tuple[list, int, int]:
    examples, dropped, truncated = [], 0, 0
    for pair in pairs:
        example = encode_pair(pair, tokenizer, template, max_length)
        if example is None:
            dropped += 1
            continue
        truncated += example.chosen.truncated or example.rejected.truncated
        examples.append(example)
    return examples, dropped, truncated


def _encode_split(pairs, tokenizer, template: str, max_length: int, role: str, notes: list[str]):
    """The pairs of one split (`role`: training or eval) tokenised, with a note of how many were
    truncated or dropped (a response cut away by max_length) added to `notes`."""
    encoded, dropped, truncated = _encode_pairs(pairs, tokenizer, template, max_length)
    if truncated:
        notes.append(f"truncated {truncated} of {len(pairs)} {role} pairs to {max_length} tokens")
    if dropped:
        notes.append(f"dropped {dropped} {role} pairs with a response cut away by max_length")
    return encoded


def prepare_preferences(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> PreferenceData:
    """Read, check, split and tokenise the preference pairs of a run."""

    def check(record, source, number):
        return to_preference_pair(record, source, number, cfg.system_prompt)

    override_chat_template(cfg.chat_template, tokenizer)
    train_pairs, eval_pairs, notes = _train_and_eval(cfg, "preference", check, seed)
    template = choose_template(cfg.template, tokenizer)
    train = _encode_split(train_pairs, tokenizer, template, cfg.max_length, "training", notes)
    if not train:
        problem = "no preference pair has both responses within max_length"
        raise DataError(describe(cfg.train), None, None, problem)
    held_out = None
    if eval_pairs:
        held_out = _encode_split(eval_pairs, tokenizer, template, cfg.max_length, "eval", notes)
        if not held_out:
            problem = "no eval pair has both responses within max_length: the eval set is empty"
            raise DataError(eval_source(cfg), None, None, problem)
    return PreferenceData(train, held_out, template, notes)


def pad_pairs(pairs: list[PairExample], pad_id: int) -> dict[str, torch.Tensor]:
    """One right-padded batch of the B chosen sequences followed by the B rejected ones.

    input_ids, attention_mask, labels: (2B, T); margin: (B,).
    """
    batch = pad_batch([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    batch["margin"] = torch.tensor([p.margin for p in pairs], dtype=torch.float32)  # (B,)
    return batch


# ------------------------------------------------------------------ prompts


def encode_prompt_record(
    prompt: str | list, conv: Conversation, tokenizer: PreTrainedTokenizerBase, template: str
) -> PromptExample:
    """Tokenise a prompt as a generation prompt under `template`."""
    ids, _ = prompt_and_reference(
        Conversation(conv.turns + [("assistant", "")], conv.extra), tokenizer, template
    )
    return PromptExample(ids, prompt, dict(conv.extra))


def prepare_prompts(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> PromptData:
    """Read, check, split and tokenise the prompts of an RL run; prompts over `max_length` tokens are dropped."""

    def check(record, source, number):
        return to_prompt(record, source, number, cfg.system_prompt)

    override_chat_template(cfg.chat_template, tokenizer)
    train_records, eval_records, notes = _train_and_eval(cfg, "prompt", check, seed)
    template = choose_template(cfg.template, tokenizer)

    def encode(records):
        examples = [encode_prompt_record(prompt, conv, tokenizer, template) for prompt, conv in records]
        kept = [e for e in examples if len(e.prompt_ids) <= cfg.max_length]
        return kept, len(examples) - len(kept)

    train, too_long = encode(train_records)
    if too_long:
        notes.append(
            f"dropped {too_long} training prompts longer than data.max_length={cfg.max_length} tokens"
        )
    if not train:
        problem = f"no prompt fits in data.max_length={cfg.max_length} tokens"
        raise DataError(describe(cfg.train), None, None, problem)
    held_out = None
    if eval_records:
        held_out, too_long = encode(eval_records)
        if too_long:
            notes.append(
                f"dropped {too_long} eval prompts longer than data.max_length={cfg.max_length} tokens"
            )
        if not held_out:
            problem = f"no eval prompt fits in data.max_length={cfg.max_length} tokens: the eval set is empty"
            raise DataError(eval_source(cfg), None, None, problem)
    return PromptData(train, held_out, template, notes)

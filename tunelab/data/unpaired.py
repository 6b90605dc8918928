"""Unpaired preference examples (KTO): reading, checking, tokenising, and the mismatched KL rows.

Records, in TRL's unpaired preference format:

- plain text: `{"prompt": str, "completion": str, "label": true | false}`;
- chat messages: `{"prompt": [messages], "completion": [assistant messages], "label": ...}`;
- other fields are kept for the template (`instruction` + `input` render alpaca's Input section);
- a preference pair (`prompt`, `chosen`, `rejected`, any form `tunelab.data.preference` reads) is
  unpaired as TRL's KTO trainer does: its chosen completion labelled true, its rejected one false
  (both in the same split).

`label` is a boolean (in a CSV file the text `true` or `false`): true for a desirable completion,
false for an undesirable one. A bad record is a `DataError` naming the file, the record (line) and
the field, or is skipped and counted with `data.skip_bad_records`; either way before the model loads.

Each example is tokenised as prompt + completion with the run's template, like one side of a
preference pair: only the completion tokens (and the template's EOS) are targets. The prompt and
the completion are kept apart so that KTO's mismatched rows (x_i, y_j), the prompt of one example
followed by the completion of another, can be assembled in any batch (`pad_unpaired`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from tunelab.config import DataConfig
from tunelab.data.collate import pad_batch
from tunelab.data.formats import Conversation
from tunelab.data.preference import (
    PreparedExamples,
    _prompt_turns,
    _response_turns,
    _train_and_eval,
    to_preference_pair,
)
from tunelab.data.splits import describe, eval_source
from tunelab.data.templates import choose_template, override_chat_template, render_segments
from tunelab.data.tokenize import IGNORE_INDEX, TokenizedExample, adds_bos, encode_segments
from tunelab.errors import DataError

FORMAT = "unpaired (prompt, completion, label) or preference"


@dataclass
class UnpairedRecord:
    """A checked record: the prompt turns, the completion turns and whether it is desirable."""

    prompt: list[tuple[str, str]]
    completion: list[tuple[str, str]]
    desirable: bool
    extra: dict = field(default_factory=dict)


@dataclass
class UnpairedExample:
    """A tokenised example: the prompt's ids, then the completion's ids and labels (targets, or -100
    on the template's text between and after the answers). Not truncated; rows are cut to
    `max_length` when they are assembled."""

    prompt_ids: list[int]
    completion_ids: list[int]
    completion_labels: list[int]
    desirable: bool

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


UnpairedData = PreparedExamples[UnpairedExample]


def to_unpaired(record: dict, source: str, number: int, system_prompt: str | None = None) -> UnpairedRecord:
    """Check an unpaired record (DataError naming the field if malformed)."""
    for key in ("prompt", "completion", "label"):
        if record.get(key) is None:
            raise DataError(source, number, key, "missing field")
    label = record["label"]
    if isinstance(label, str) and label.strip().lower() in ("true", "false"):
        label = label.strip().lower() == "true"  # a CSV cell
    if not isinstance(label, bool):
        raise DataError(source, number, "label", f"expected true or false, got {label!r}")
    completion = record["completion"]
    if not isinstance(completion, (str, list)):
        problem = f"expected a string or a list of messages, got {type(completion).__name__}"
        raise DataError(source, number, "completion", problem)
    prompt_turns = _prompt_turns(record["prompt"], source, number)
    completion_turns = _response_turns(completion, source, number, "completion")
    if system_prompt and prompt_turns[0][0] != "system":
        prompt_turns = [("system", system_prompt)] + prompt_turns
    extra = {k: v for k, v in record.items() if k not in ("prompt", "completion", "label")}
    return UnpairedRecord(prompt_turns, completion_turns, label, extra)


def to_unpaired_records(
    record: dict, source: str, number: int, system_prompt: str | None = None
) -> list[UnpairedRecord]:
    """Check a record: an unpaired one gives itself; a preference pair (a record with `chosen` or
    `rejected` and no `completion`) gives its chosen completion, desirable, and its rejected one."""
    if "completion" not in record and ("chosen" in record or "rejected" in record):
        pair = to_preference_pair(record, source, number, system_prompt)
        return [
            UnpairedRecord(pair.prompt, pair.chosen, True, pair.extra),
            UnpairedRecord(pair.prompt, pair.rejected, False, pair.extra),
        ]
    return [to_unpaired(record, source, number, system_prompt)]


def encode_unpaired(
    record: UnpairedRecord, tokenizer: PreTrainedTokenizerBase, template: str
) -> UnpairedExample | None:
    """Tokenise prompt + completion under `template` and split it where the completion starts (its
    first target token). None when the completion has no target token."""
    add_special = template != "chat" and adds_bos(tokenizer)
    in_prompt = sum(role == "assistant" for role, _ in record.prompt)  # earlier assistant turns are context
    segments, seen = [], 0
    conversation = Conversation(record.prompt + record.completion, record.extra)
    for text, is_target in render_segments(conversation, tokenizer, template):
        seen += is_target
        segments.append((text, is_target and seen > in_prompt))
    tokens = encode_segments(segments, tokenizer, 1 << 62, False, add_special)
    start = next((i for i, label in enumerate(tokens.labels) if label != IGNORE_INDEX), None)
    if not start:  # no target, or a target at position 0 that nothing predicts
        return None
    return UnpairedExample(
        tokens.input_ids[:start], tokens.input_ids[start:], tokens.labels[start:], record.desirable
    )


def row(prompt_of: UnpairedExample, completion_of: UnpairedExample, max_length: int) -> TokenizedExample:
    """The prompt of one example followed by the completion of another (or the same), cut to
    `max_length` tokens."""
    ids = prompt_of.prompt_ids + completion_of.completion_ids
    labels = [IGNORE_INDEX] * len(prompt_of.prompt_ids) + completion_of.completion_labels
    return TokenizedExample(ids[:max_length], labels[:max_length], len(ids) > max_length)


def _encode_split(records, tokenizer, template: str, max_length: int, role: str, notes: list[str]):
    """The examples of one split (`role`: training or eval), without those whose completion
    max_length cuts away entirely; a note says how many were truncated or dropped."""
    examples, dropped, truncated = [], 0, 0
    for record in records:
        example = encode_unpaired(record, tokenizer, template)
        if example is None or row(example, example, max_length).num_targets == 0:
            dropped += 1
            continue
        truncated += example.length > max_length
        examples.append(example)
    if truncated:
        notes.append(f"truncated {truncated} of {len(records)} {role} examples to {max_length} tokens")
    if dropped:
        notes.append(f"dropped {dropped} {role} examples with a completion cut away by max_length")
    return examples


def prepare_unpaired(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> UnpairedData:
    """Read, check, split and tokenise the unpaired examples of a run."""

    def check(record, source, number):
        return to_unpaired_records(record, source, number, cfg.system_prompt)

    override_chat_template(cfg.chat_template, tokenizer)  # as prepare_data and prepare_preferences do
    if cfg.format == "preference":  # pairs are read and unpaired
        cfg = dataclasses.replace(cfg, format="auto")
    train_groups, eval_groups, notes = _train_and_eval(cfg, FORMAT, check, seed)
    train_records = [record for group in train_groups for record in group]
    eval_records = [record for group in eval_groups or [] for record in group]
    template = choose_template(cfg.template, tokenizer)
    train = _encode_split(train_records, tokenizer, template, cfg.max_length, "training", notes)
    if not train:
        raise DataError(describe(cfg.train), None, None, "no example has a completion within max_length")
    held_out = None
    if eval_records:
        held_out = _encode_split(eval_records, tokenizer, template, cfg.max_length, "eval", notes)
        if not held_out:
            problem = "no eval example has a completion within max_length: the eval set is empty"
            raise DataError(eval_source(cfg), None, None, problem)
    return UnpairedData(train, held_out, template, notes)


def pad_unpaired(
    examples: list[UnpairedExample], partners: list[UnpairedExample], pad_id: int, max_length: int
) -> dict[str, torch.Tensor]:
    """One right-padded batch of B examples and of their B mismatched rows: input_ids,
    attention_mask, labels (B, T) of (x_i, y_i); kl_input_ids, kl_attention_mask, kl_labels
    (B, T') of (x_i, y'_i), y'_i the completion of `partners[i]`; desirable (B,) bool."""
    batch = pad_batch([row(e, e, max_length) for e in examples], pad_id)
    mismatched = pad_batch([row(e, p, max_length) for e, p in zip(examples, partners, strict=True)], pad_id)
    batch.update({f"kl_{name}": tensor for name, tensor in mismatched.items()})
    batch["desirable"] = torch.tensor([e.desirable for e in examples], dtype=torch.bool)  # (B,)
    return batch


def mismatched_partners(indices: list[int]) -> list[int]:
    """KTO's mismatched completions for a list of examples, as TRL builds them: each example's
    completion partner is the previous one's, cyclically ((x_1, y_n), (x_2, y_1), ...)."""
    return indices[-1:] + indices[:-1]

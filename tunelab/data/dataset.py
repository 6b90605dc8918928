"""From a `DataConfig` to tokenised training and evaluation examples.

Steps: read records -> check each and turn it into a `Conversation` (errors name the file, the
record and the field; with `skip_bad_records` they are counted instead) -> render with the template
-> tokenise. All checking happens here, before any training starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from tunelab.config import DataConfig
from tunelab.data.formats import Conversation, detect_format, to_conversation
from tunelab.data.sources import check_records, read_records
from tunelab.data.splits import eval_source, split_train_eval
from tunelab.data.templates import choose_template, generation_prompt, render_segments
from tunelab.data.tokenize import TokenizedExample, adds_bos, encode_prompt, encode_segments
from tunelab.errors import DataError


@dataclass
class SplitData:
    """Tokenised examples of one split plus what is needed to evaluate by generation."""

    examples: list[TokenizedExample]
    conversations: list[Conversation]
    skipped: int = 0
    truncated: int = 0
    empty: int = 0
    """Examples dropped because no target token survived truncation."""


@dataclass
class PreparedData:
    train: SplitData
    eval: SplitData | None
    format: str
    template: str
    notes: list[str] = field(default_factory=list)


def read_conversations(
    source: str, split: str, fmt: str, skip_bad: bool, system_prompt: str | None = None
) -> tuple[list[Conversation], str, int]:
    """Read and check every record: (conversations, resolved format, number skipped)."""
    records, skipped = read_records(source, split, skip_bad)
    if not records:
        raise DataError(source, None, None, "no usable records")
    resolved = fmt
    if fmt == "auto":
        resolved = detect_format(records[0][1])
        if resolved == "unknown":
            number, record = records[0]
            raise DataError(
                source,
                number,
                None,
                f"cannot tell the data format from fields {sorted(record)}; set data.format",
            )

    def check(record: dict, source: str, number: int) -> Conversation:
        return to_conversation(record, resolved, source, number, system_prompt)

    conversations, bad = check_records(source, records, skip_bad, check)
    return conversations, resolved, skipped + bad


def tokenize_split(
    conversations: list[Conversation], tokenizer: PreTrainedTokenizerBase, template: str, cfg: DataConfig
) -> SplitData:
    """Tokenise conversations; drop (and count) those left without a target token."""
    add_special = template != "chat" and adds_bos(tokenizer)
    examples, kept, truncated, empty = [], [], 0, 0
    for conv in conversations:
        example = encode_segments(
            render_segments(conv, tokenizer, template),
            tokenizer,
            cfg.max_length,
            cfg.train_on_prompt,
            add_special,
        )
        truncated += example.truncated
        if example.num_targets == 0:
            empty += 1
            continue
        examples.append(example)
        kept.append(conv)
    return SplitData(examples, kept, truncated=truncated, empty=empty)


def prepare_data(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0, role: str = "training"
) -> PreparedData:
    """Read, check, split and tokenise the training (and evaluation) data of a run. `role` names
    the examples of `cfg.train` in the notes and errors (`tunelab eval` reads its data as `eval`)."""
    if not cfg.train:
        raise DataError("data.train", None, None, "no training data given")
    train_convs, fmt, skipped = read_conversations(
        cfg.train, cfg.split, cfg.format, cfg.skip_bad_records, cfg.system_prompt
    )

    def read_eval(source: str, split: str) -> tuple[list[Conversation], int]:
        conversations, _, skipped = read_conversations(
            source, split, fmt, cfg.skip_bad_records, cfg.system_prompt
        )
        return conversations, skipped

    train_convs, eval_convs, eval_skipped = split_train_eval(cfg, train_convs, read_eval, seed)
    template = choose_template(cfg.template, tokenizer) if fmt != "text" else "text"
    train = tokenize_split(train_convs, tokenizer, template, cfg)
    train.skipped = skipped
    evaluation = None
    if eval_convs:
        evaluation = tokenize_split(eval_convs, tokenizer, template, cfg)
        evaluation.skipped = eval_skipped
    notes = []
    if skipped or eval_skipped:
        notes.append(f"skipped {skipped + eval_skipped} bad records")
    splits = [(role, train, len(train_convs))]
    if evaluation is not None:
        splits.append(("eval", evaluation, len(eval_convs)))
    for name, split, total in splits:
        if split.truncated:
            notes.append(f"truncated {split.truncated} of {total} {name} examples to {cfg.max_length} tokens")
        if split.empty:
            notes.append(
                f"dropped {split.empty} {name} examples with no response tokens left after truncation"
            )
    if not train.examples:
        raise DataError(
            cfg.train, None, None, f"no {role} example has response tokens within max_length={cfg.max_length}"
        )
    if evaluation is not None and not evaluation.examples:
        raise DataError(
            eval_source(cfg),
            None,
            None,
            f"no eval example has response tokens within max_length={cfg.max_length}: the eval set is empty",
        )
    return PreparedData(train, evaluation, fmt, template, notes)


def prompt_and_reference(
    conv: Conversation, tokenizer: PreTrainedTokenizerBase, template: str
) -> tuple[list[int], str]:
    """Token ids of the generation prompt for `conv` and the reference response."""
    text, reference = generation_prompt(conv, tokenizer, template)
    return encode_prompt(
        text, tokenizer, add_special_tokens=template != "chat" and adds_bos(tokenizer)
    ), reference

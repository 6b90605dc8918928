"""Record formats and their checks: instruction, chat, prompt/completion, text, preference, prompt.

A record is turned into a `Conversation`: a list of turns (role, content). Each format maps onto it:

- instruction: `instruction` + optional `input`/`context` + `output`/`response` (Alpaca and Dolly
  field names) -> user turn, assistant turn;
- chat: `messages` (or `conversations`), a list of `{role, content}`;
- prompt_completion: `prompt`, `completion` -> user turn, assistant turn;
- text: `text` -> one raw-text turn (continued pre-training: loss on every token);
- preference: `prompt` + `chosen` + `rejected` (strings, or message lists);
- prompt: `prompt` only (reinforcement-learning prompts; an optional `answer` is kept).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tunelab.errors import DataError

INSTRUCTION_KEYS = ("instruction",)
INPUT_KEYS = ("input", "context")
RESPONSE_KEYS = ("output", "response")
ROLES = ("system", "user", "assistant")


@dataclass
class Conversation:
    """A record as turns. `role` is system/user/assistant, or `text` for raw text."""

    turns: list[tuple[str, str]]
    extra: dict = field(default_factory=dict)
    """Fields kept for later use (e.g. `answer` for reward functions)."""


def detect_format(record: dict) -> str:
    """Guess the format from a record's keys."""
    keys = set(record)
    if {"chosen", "rejected"} <= keys:
        return "preference"
    if "messages" in keys or "conversations" in keys:
        return "chat"
    if "instruction" in keys:
        return "instruction"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    if "prompt" in keys:
        return "prompt"
    return "unknown"


def _text_field(record: dict, keys: tuple[str, ...], source: str, number: int, required: bool = True) -> str:
    for key in keys:
        if key in record and record[key] is not None:
            value = record[key]
            if not isinstance(value, str):
                raise DataError(source, number, key, f"expected a string, got {type(value).__name__}")
            if required:
                require_text(value, source, number, key)
            return value
    if required:
        raise DataError(
            source,
            number,
            keys[0],
            "missing field" + (f" (or {', '.join(keys[1:])})" if len(keys) > 1 else ""),
        )
    return ""


def require_text(value: str, source: str, number: int, key: str) -> None:
    """A required string must hold some text: an empty one (or only whitespace) is a bad record."""
    if not value.strip():
        raise DataError(source, number, key, "is empty" if not value else "holds only whitespace")


def _messages(value, source: str, number: int, key: str) -> list[tuple[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(source, number, key, "expected a non-empty list of {role, content} messages")
    turns = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(source, number, f"{key}[{i}]", "expected an object with role and content")
        role = message.get("role", message.get("from"))
        content = message.get("content", message.get("value"))
        role = {"human": "user", "gpt": "assistant"}.get(role, role)
        if role not in ROLES:
            raise DataError(source, number, f"{key}[{i}].role", f"must be one of {ROLES}, got {role!r}")
        if not isinstance(content, str):
            raise DataError(source, number, f"{key}[{i}].content", "expected a string")
        if role != "system":  # an empty system message (common in chat exports) says nothing
            require_text(content, source, number, f"{key}[{i}].content")
        turns.append((role, content))
    return turns


def to_conversation(
    record: dict, fmt: str, source: str, number: int, system_prompt: str | None = None
) -> Conversation:
    """Check a record of format `fmt` and turn it into a `Conversation` (DataError if malformed)."""
    system = [("system", system_prompt)] if system_prompt else []
    if fmt == "instruction":
        instruction = _text_field(record, INSTRUCTION_KEYS, source, number)
        context = _text_field(record, INPUT_KEYS, source, number, required=False)
        response = _text_field(record, RESPONSE_KEYS, source, number)
        user = instruction if not context.strip() else f"{instruction}\n\n{context}"
        return Conversation(
            system + [("user", user), ("assistant", response)], {"instruction": instruction, "input": context}
        )
    if fmt == "chat":
        key = "messages" if "messages" in record else "conversations"
        if key not in record:
            raise DataError(source, number, "messages", "missing field")
        turns = _messages(record[key], source, number, key)
        if not any(role == "assistant" for role, _ in turns):
            raise DataError(source, number, key, "has no assistant message to learn from")
        if system and turns[0][0] != "system":
            turns = system + turns
        return Conversation(turns)
    if fmt == "prompt_completion":
        prompt = _text_field(record, ("prompt",), source, number)
        completion = _text_field(record, ("completion",), source, number)
        return Conversation(system + [("user", prompt), ("assistant", completion)])
    if fmt == "text":
        return Conversation([("text", _text_field(record, ("text",), source, number))])
    if fmt == "prompt":
        prompt = record.get("prompt")
        if isinstance(prompt, list):
            turns = _messages(prompt, source, number, "prompt")
        else:
            turns = system + [("user", _text_field(record, ("prompt",), source, number))]
        return Conversation(turns, {k: v for k, v in record.items() if k != "prompt"})
    if fmt == "preference":
        problem = (
            "a preference pair (chosen, rejected): objectives dpo and reward train on pairs; sft takes "
            "instruction, chat, prompt/completion or text records"
        )
        raise PairRecordsError(source, number, None, problem)
    raise DataError(source, number, None, f"unknown data format {fmt!r}")


class PairRecordsError(DataError):
    """Preference pairs where conversations were expected (`tunelab eval` then reads them as pairs)."""

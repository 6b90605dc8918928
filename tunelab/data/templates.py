"""Rendering a `Conversation` into text segments, each marked as prompt (no loss) or target (loss).

Two templates:

- `chat`: the tokenizer's own chat template (`apply_chat_template`), or `data.chat_template` in its
  place. Segments come from rendering the conversation turn by turn: the text an assistant turn
  adds is a target, everything between is prompt. Most templates render a conversation as an
  extension of its prefixes. Some rewrite earlier turns (Qwen3 drops `<think>...</think>` from
  assistant turns before the last user turn): for those, `render_examples` makes one example per
  assistant turn k, the render of turns[:k] with the generation prompt (no loss) followed by the
  text turn k adds in the render of turns[:k+1] where it is the last turn (loss), so every target is
  rendered as the model produces it. `render_segments` (one sequence, for preference pairs)
  refuses such templates.
- `alpaca`: the documented default for tokenizers without a chat template:

      ### Instruction:
      {instruction}

      ### Input:            (only when the record has an input/context)
      {input}

      ### Response:
      {response}<eos>

- `plain`: no decoration at all: the prompt text, then the response and EOS (what TRL does with
  prompt/completion pairs): `{prompt}{response}<eos>`.

Raw text (`text` turns) is a single target segment, EOS appended (documents end where they end).
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerBase

from tunelab.data.formats import Conversation
from tunelab.errors import TunelabError

Segment = tuple[str, bool]  # (text, is_target)


class NotPrefixConsistent(TunelabError):
    """The chat template rewrites earlier turns when a conversation grows."""


def override_chat_template(chat_template: str | None, tokenizer: PreTrainedTokenizerBase) -> None:
    """Set `data.chat_template` (Jinja text, or a path to a file holding it) as the tokenizer's chat
    template, for training and generation alike; nothing when unset."""
    if not chat_template:
        return
    text = chat_template
    if "{" not in chat_template:  # not Jinja: a file name
        path = Path(chat_template).expanduser()
        if not path.is_file():
            raise TunelabError(
                f"data.chat_template: {chat_template!r} is neither a Jinja template nor a file"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise TunelabError(f"data.chat_template: cannot read {chat_template!r}: {err}") from None
    tokenizer.chat_template = text


def choose_template(template: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """Resolve `auto`: chat if the tokenizer has a chat template, else alpaca."""
    if template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise TunelabError("data.template is 'chat' but the tokenizer has no chat template; use 'alpaca'")
    return template


def _alpaca_user(content: str, extra: dict) -> str:
    if "instruction" in extra and extra.get("input", "").strip():
        return f"### Instruction:\n{extra['instruction']}\n\n### Input:\n{extra['input']}\n\n### Response:\n"
    return f"### Instruction:\n{content}\n\n### Response:\n"


def render_segments(conv: Conversation, tokenizer: PreTrainedTokenizerBase, template: str) -> list[Segment]:
    """The conversation as (text, is_target) segments under `template` (`chat` or `alpaca`)."""
    if conv.turns and conv.turns[0][0] == "text":
        return [(conv.turns[0][1] + (tokenizer.eos_token or ""), True)]
    if template == "plain":
        plain: list[Segment] = []
        for role, content in conv.turns:
            if role == "assistant":
                plain.append((f"{content}{tokenizer.eos_token or ''}", True))
            else:
                plain.append((content, False))
        return plain
    if template == "alpaca":
        segments: list[Segment] = []
        for role, content in conv.turns:
            if role == "system":
                segments.append((f"{content}\n\n", False))
            elif role == "user":
                segments.append((_alpaca_user(content, conv.extra), False))
            else:
                segments.append((f"{content}{tokenizer.eos_token or ''}", True))
                segments.append(("\n\n", False))
        while segments and not segments[-1][1] and segments[-1][0] == "\n\n":
            segments.pop()
        return segments
    return _chat_segments(conv, tokenizer)


def render_examples(
    conv: Conversation, tokenizer: PreTrainedTokenizerBase, template: str
) -> list[list[Segment]]:
    """The training examples of a conversation: one (`render_segments`), or, under a chat template
    that rewrites earlier turns, one per assistant turn (module docstring)."""
    if template != "chat" or (conv.turns and conv.turns[0][0] == "text"):
        return [render_segments(conv, tokenizer, template)]
    try:
        return [_chat_segments(conv, tokenizer)]
    except NotPrefixConsistent:
        pass
    examples = []
    for i, (role, _) in enumerate(conv.turns):
        if role != "assistant":
            continue
        prompt = _render(tokenizer, conv.turns[:i], add_generation_prompt=True)
        full = _render(tokenizer, conv.turns[: i + 1], add_generation_prompt=False)
        if not full.startswith(prompt):
            raise TunelabError(
                "the tokenizer's chat template does not render an assistant turn after its prompt "
                "(the render of the turns up to it does not begin with the generation prompt), so "
                "response tokens cannot be located; use data.template=alpaca"
            )
        examples.append([(prompt, False), (full[len(prompt) :], True)] if prompt else [(full, True)])
    return examples


def _render(tokenizer, turns, add_generation_prompt: bool) -> str:
    messages = [{"role": role, "content": content} for role, content in turns]
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _chat_segments(conv: Conversation, tokenizer: PreTrainedTokenizerBase) -> list[Segment]:
    segments: list[Segment] = []
    done = ""  # text rendered so far
    for i, (role, _) in enumerate(conv.turns):
        if role != "assistant":
            continue
        prompt = _render(tokenizer, conv.turns[:i], add_generation_prompt=True)
        full = _render(tokenizer, conv.turns[: i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise NotPrefixConsistent(
                "the tokenizer's chat template does not render a conversation as an extension of its "
                "prefixes, so response tokens cannot be located; use data.template=alpaca"
            )
        if prompt[len(done) :]:
            segments.append((prompt[len(done) :], False))
        segments.append((full[len(prompt) :], True))
        done = full
    return segments


def generation_prompt(
    conv: Conversation, tokenizer: PreTrainedTokenizerBase, template: str
) -> tuple[str, str]:
    """(prompt text up to the last assistant turn, that turn's reference content) for evaluation."""
    last = max(i for i, (role, _) in enumerate(conv.turns) if role == "assistant")
    reference = conv.turns[last][1]
    head = Conversation(conv.turns[:last], conv.extra)
    if template in ("alpaca", "plain"):
        text = "".join(
            t
            for t, _ in render_segments(
                Conversation(conv.turns[: last + 1], conv.extra), tokenizer, template
            )[:-1]
        )
        # the last segment is the reference response; everything before it is the prompt
        return text, reference
    return _render(tokenizer, head.turns, add_generation_prompt=True), reference

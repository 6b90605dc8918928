"""Rendering a `Conversation` into text segments, each marked as prompt (no loss) or target (loss).

Two templates:

- `chat`: the tokenizer's own chat template (`apply_chat_template`). Segments come from rendering
  the conversation turn by turn: the text an assistant turn adds is a target, everything between is
  prompt. The template must render each conversation as an extension of its prefixes, which every
  mainstream template does; we check it and say so when it does not.
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

from transformers import PreTrainedTokenizerBase

from tunelab.data.formats import Conversation
from tunelab.errors import TunelabError

Segment = tuple[str, bool]  # (text, is_target)


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
            raise TunelabError(
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

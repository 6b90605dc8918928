"""Ollama's `Modelfile` beside an exported GGUF: `ollama create NAME -f Modelfile` imports the model.

    FROM ./model.gguf
    TEMPLATE <the prompt format, in Ollama's (Go template) syntax, in triple quotes>
    PARAMETER stop "<eos>"   one line per end-of-sequence / end-of-turn token

Ollama's templates are Go templates, not the Jinja of `tokenizer_config.json`, so the chat template is
translated by *measuring* it rather than parsing it: the Jinja template is rendered on conversations
whose contents are markers, which gives each role's text before and after its content and the
generation prompt. The Go template built from those pieces is then checked: its Python equivalent
(`render_pieces`) must reproduce the Jinja rendering of two longer conversations exactly. A template
that is not a per-message wrapping (one that moves the system prompt into the first user turn, or adds
a default system prompt) fails the check, and the Modelfile then has no TEMPLATE line: Ollama falls
back to its own reading of the GGUF's `tokenizer.chat_template`.

A tokenizer without a chat template means the model was trained on tunelab's `alpaca` template
(`tunelab/data/templates.py`), which is written as such.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant")
MARK = "\u2063TUNELAB{}\u2063"  # invisible separator: text no template adds by itself

ALPACA_TEMPLATE = "{{ if .System }}{{ .System }}\n\n{{ end }}### Instruction:\n{{ .Prompt }}\n\n### Response:\n{{ .Response }}"


@dataclass
class ChatPieces:
    """A chat template measured as text wrapped around each message, plus the generation prompt."""

    head: str  # once, before the first message (a BOS the template writes itself)
    before: dict[str, str]
    after: dict[str, str]
    generation: str


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _between(text: str, start: str, end: str | None) -> str:
    begin = text.index(start) + len(start)
    return text[begin:] if end is None else text[begin : text.index(end, begin)]


def measure_chat_template(tokenizer: PreTrainedTokenizerBase) -> ChatPieces | None:
    """The template's pieces, or None when it is not a per-message wrapping (see the module docstring)."""
    u, a, s = MARK.format("U"), MARK.format("A"), MARK.format("S")
    try:
        only_user = _render(tokenizer, [{"role": "user", "content": u}], False)
        with_answer = _render(
            tokenizer, [{"role": "user", "content": u}, {"role": "assistant", "content": a}], False
        )
        asking = _render(tokenizer, [{"role": "user", "content": u}], True)
    except (
        Exception
    ):  # a template that refuses these conversations (Jinja raise_exception) cannot be measured
        return None
    bos = tokenizer.bos_token or ""
    before_user = only_user[: only_user.index(u)]
    head = bos if bos and before_user.startswith(bos) else ""
    after_user = only_user[only_user.index(u) + len(u) :]
    between = _between(with_answer, u, a)
    if not between.startswith(after_user) or not asking.startswith(only_user):
        return None
    before = {"user": before_user[len(head) :], "assistant": between[len(after_user) :]}
    after = {"user": after_user, "assistant": _between(with_answer, a, None)}
    try:
        with_system = _render(
            tokenizer, [{"role": "system", "content": s}, {"role": "user", "content": u}], False
        )
    except Exception:  # a template that refuses a system role (Gemma's): the system branch is left out
        with_system = None
    if with_system is not None:
        if s not in with_system or u not in with_system:
            return None
        before["system"] = with_system[len(head) : with_system.index(s)]
        system_gap = _between(with_system, s, u)
        if not system_gap.endswith(before["user"]):
            return None  # the system prompt is not a message of its own (folded into the user turn)
        after["system"] = system_gap[: len(system_gap) - len(before["user"])]
    pieces = ChatPieces(head, before, after, asking[len(only_user) :])
    return pieces if _reproduces(tokenizer, pieces) else None


def render_pieces(pieces: ChatPieces, messages: list[dict], generation: bool) -> str:
    """What the Go template of `go_template(pieces)` renders, in Python (for the check)."""
    text = pieces.head + "".join(
        pieces.before[m["role"]] + m["content"] + pieces.after[m["role"]] for m in messages
    )
    return text + (pieces.generation if generation else "")


def _reproduces(tokenizer: PreTrainedTokenizerBase, pieces: ChatPieces) -> bool:
    turns = [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And 4 + 4?\nSay it in words."},
    ]
    cases = [turns]
    if "system" in pieces.before:
        cases.append([{"role": "system", "content": "You are brief."}, *turns])
    try:
        return all(
            _render(tokenizer, case, generation) == render_pieces(pieces, case, generation)
            for case in cases
            for generation in (False, True)
        )
    except Exception:
        return False


def _go_string(text: str) -> str:
    """A Go template action printing `text` literally (a Go string literal: JSON's escapes are Go's)."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def go_template(pieces: ChatPieces) -> str:
    """The Ollama (Go) template of measured pieces: each message wrapped by its role's text, and the
    generation prompt after the last message unless it is the assistant's. Every text is a quoted
    action and every line break sits inside `{{-` / `-}}` trimming, so the template adds no text of
    its own."""
    lines = [_go_string(pieces.head), "{{- range $i, $_ := .Messages }}"]
    lines.append("{{- $last := eq (len (slice $.Messages $i)) 1 }}")
    for index, role in enumerate(role for role in ROLES if role in pieces.before):
        keyword = "if" if index == 0 else "else if"
        lines.append(f'{{{{- {keyword} eq .Role "{role}" -}}}}')  # -}}: the line break is not text
        lines.append(f"{_go_string(pieces.before[role])}{{{{ .Content }}}}{_go_string(pieces.after[role])}")
    lines.append("{{- end }}")
    lines.append(
        f'{{{{- if and $last (ne .Role "assistant") }}}}{_go_string(pieces.generation)}{{{{- end }}}}'
    )
    lines.append("{{- end }}")
    return "\n".join(line for line in lines if line)


def modelfile_text(
    gguf_name: str, tokenizer: PreTrainedTokenizerBase, stop_tokens: list[str], template: str = "auto"
) -> str:
    """The Modelfile: FROM, TEMPLATE (when known), one PARAMETER stop per stop token. `template` is
    the run's `data.template` (auto: chat when the tokenizer has a chat template, else alpaca)."""
    lines = [f"FROM ./{gguf_name}", ""]
    if template == "auto":
        template = "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
    if template == "plain":
        lines += ["# tunelab's plain prompt format: the prompt as it is.", 'TEMPLATE """{{ .Prompt }}"""']
    elif template == "chat":
        pieces = measure_chat_template(tokenizer)
        if pieces is None:
            lines += [
                "# The chat template is not a per-message wrapping tunelab can translate; Ollama reads",
                "# tokenizer.chat_template from the GGUF instead.",
            ]
        else:
            lines += [
                "# The tokenizer's chat template, measured and translated (tunelab/export/modelfile.py)."
            ]
            lines.append(f'TEMPLATE """{go_template(pieces)}"""')
    else:
        lines += [
            "# tunelab's alpaca prompt format, which the model was trained on (tunelab/data/templates.py)."
        ]
        lines.append(f'TEMPLATE """{ALPACA_TEMPLATE}"""')
    lines.append("")
    lines += [
        f"PARAMETER stop {json.dumps(token, ensure_ascii=False)}" for token in dict.fromkeys(stop_tokens)
    ]
    return "\n".join(lines) + "\n"


def write_modelfile(
    folder: Path, gguf_name: str, tokenizer: PreTrainedTokenizerBase, stops: list[str], template: str = "auto"
) -> Path:
    """Write `folder/Modelfile` (see `modelfile_text`); returns its path."""
    path = folder / "Modelfile"
    path.write_text(modelfile_text(gguf_name, tokenizer, stops, template), encoding="utf-8")
    return path

"""Rewards for PPO and GRPO: example reward functions, loading those a config names, and the
weighted sum of reward functions and a reward model that scores each completion.

A reward function is any Python callable with TRL's signature

    fn(prompts: list, completions: list[str], **columns) -> list[float]

`prompts` are the prompts as the data gives them (strings or message lists), `completions` the
decoded responses (special tokens removed), and `columns` every other field of the prompt records
as lists (e.g. `answer=[...]`), plus `completion_ids` (the generated token ids, the EOS included
when one was generated). A config names it `package.module:function` or `path/to/file.py:function`.

The score of completion i is

    s_i = sum_k w_k f_k(prompt_i, completion_i) [+ r_phi(prompt_i, completion_i)]

with weights w_k (`reward_weights`, default 1) and an optional reward model r_phi (`reward_model`,
tunelab/rl/reward_model.py): tunelab's own, which shares the policy's tokenizer and template and
scores the rollout's tokens as they are, or any one-label sequence classifier; one with another
tokenizer reads the prompt and completion text again, rendered with its own chat template.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from collections.abc import Callable
from pathlib import Path

import torch

from tunelab.data.collate import pad_batch
from tunelab.data.formats import Conversation
from tunelab.data.templates import choose_template, render_segments
from tunelab.data.tokenize import adds_bos, encode_segments
from tunelab.errors import TunelabError

ANSWER_MARK = "####"  # GSM8K puts the final answer after "#### "


# ------------------------------------------------------------------ example reward functions


def _final_answer(text: str) -> str:
    """The text after the last `####` if any (GSM8K's answer format), stripped; thousands commas removed."""
    if ANSWER_MARK in text:
        text = text.rsplit(ANSWER_MARK, 1)[1]
    text = text.strip()
    return re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)


def exact_answer(prompts: list, completions: list[str], answer: list[str], **_) -> list[float]:
    """1.0 when the completion is the reference `answer` (both stripped; for GSM8K-style answers,
    the text after the last `####` of each), else 0.0. Fits the demo tasks and openai/gsm8k."""
    return [
        float(_final_answer(completion) == _final_answer(str(reference)))
        for completion, reference in zip(completions, answer, strict=True)
    ]


def one_line(prompts: list, completions: list[str], **_) -> list[float]:
    """A format check: 1.0 for a non-empty single-line answer without template markup (`###`), as
    the demo tasks want, else 0.0."""
    return [
        float(bool(text.strip()) and "\n" not in text.strip() and "###" not in text) for text in completions
    ]


# ------------------------------------------------------------------ loading


def split_reward_spec(spec: str) -> tuple[str, str]:
    """(module or file, function name) of `package.module:function` or `path/to/file.py:function`;
    ValueError for any other shape (the config turns it into a `ConfigError` naming the key)."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ValueError(
            f"reward function {spec!r} must look like package.module:function or path/file.py:function"
        )
    return target, name


def load_reward_function(spec: str) -> Callable:
    """The callable named by `package.module:function` or `path/to/file.py:function` (its shape
    was checked with the config; what cannot be found or imported is a `TunelabError`)."""
    target, name = split_reward_spec(spec)
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise TunelabError(f"reward function {spec!r}: file {target} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"tunelab_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as err:
            raise TunelabError(f"reward function {spec!r}: cannot import {target}: {err}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise TunelabError(f"reward function {spec!r}: {target} has no function {name!r}")
    return function


def check_reward_spec(specs: list[str], weights: list[float] | None, reward_model: str | None) -> None:
    """Config-time checks shared by PPO and GRPO (raise ValueError, which the config reports as a
    `ConfigError`)."""
    if not specs and not reward_model:
        raise ValueError("give reward_functions (package.module:function) and/or a reward_model")
    for spec in specs:
        split_reward_spec(spec)
    if weights is not None and len(weights) != len(specs):
        raise ValueError(f"reward_weights has {len(weights)} values for {len(specs)} reward_functions")


# ------------------------------------------------------------------ scoring


class Rewards:
    """The weighted reward functions and the optional reward model of a run."""

    def __init__(
        self,
        specs: list[str],
        weights: list[float] | None,
        reward_model: str | None,
        policy_tokenizer,
        template: str,
        device: torch.device,
        dtype: str = "float32",
    ):
        self.functions = [(split_reward_spec(spec)[1], load_reward_function(spec)) for spec in specs]
        self.weights = list(weights) if weights is not None else [1.0] * len(specs)
        self.model = None
        if reward_model:
            from tunelab.rl.reward_model import load_reward_model

            self.model = load_reward_model(reward_model, dtype=dtype, device=device)
            # Another tokenizer: the reward model reads the text again, rendered its own way.
            self.own_tokens = self.model.tokenizer.get_vocab() == policy_tokenizer.get_vocab()
            if not self.own_tokens and self.model.head is not None:
                raise TunelabError(
                    f"reward model {reward_model} has another tokenizer than the policy; "
                    "train it from the same base model"
                )
            self.reward_template = (
                template if self.own_tokens else choose_template("auto", self.model.tokenizer)
            )
            if self.model.template is not None and self.model.template != template:
                raise TunelabError(
                    f"reward model {reward_model} was trained with template {self.model.template!r}, "
                    f"but this run renders prompts with {template!r}; set data.template"
                )

    def _retokenized(self, prompts: list, completions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt + completion as the reward model's tokenizer encodes them, under its chat template
        (else the run's template), right-padded: (N, T) ids and mask."""
        tokenizer = self.model.tokenizer
        add_special = self.reward_template != "chat" and adds_bos(tokenizer)
        examples = []
        for prompt, completion in zip(prompts, completions, strict=True):
            turns = (
                [("user", prompt)] if isinstance(prompt, str) else [(m["role"], m["content"]) for m in prompt]
            )
            conversation = Conversation([*turns, ("assistant", completion)])
            segments = render_segments(conversation, tokenizer, self.reward_template)
            examples.append(encode_segments(segments, tokenizer, 1 << 30, False, add_special))
        batch = pad_batch(examples, tokenizer.pad_token_id)
        return batch["input_ids"], batch["attention_mask"]

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.functions] + (["model"] if self.model else [])

    def score(
        self,
        prompts: list,
        completions: list[str],
        completion_ids: list[list[int]],
        columns: dict,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total score (N,) float32, name -> that source's scores (N,)) for N completions.

        `columns` holds the prompt records' other fields as lists; `input_ids`/`attention_mask`
        (N, T) are prompt + completion for the reward model.
        """
        n = len(completions)
        parts: dict[str, torch.Tensor] = {}
        total = torch.zeros(n, dtype=torch.float32)
        for (name, function), weight in zip(self.functions, self.weights, strict=True):
            values = function(
                prompts=prompts, completions=completions, completion_ids=completion_ids, **columns
            )
            if values is None or len(values) != n:
                raise TunelabError(
                    f"reward function {name} returned {len(values) if values is not None else None} values for {n} completions"
                )
            try:
                scores = torch.tensor([float(v) for v in values], dtype=torch.float32)
            except (TypeError, ValueError):
                raise TunelabError(
                    f"reward function {name} must return numbers, got {list(values)[:3]}"
                ) from None
            parts[name] = scores
            total = total + weight * scores
        if self.model is not None:
            if not self.own_tokens:
                input_ids, attention_mask = self._retokenized(prompts, completions)
            scores = self.model.score(input_ids, attention_mask).cpu()
            parts["model"] = scores
            total = total + scores
        return total, parts

"""Samples while training (`eval.sample_prompts`): at every evaluation the model answers the same
prompts greedily, so that a run shows what it says, not only its loss.

Each prompt is rendered as one user turn (after `data.system_prompt`, as in training) with the
run's template, exactly as `tunelab generate --prompt` renders it; with raw-text data (`text`
format) the prompt is the text to continue. Generation goes through `tunelab.generation.generate`
(greedy, `eval.max_new_tokens`, `eval.batch_size` prompts at a time) and the completion is the
response up to its end-of-sequence token. The answers join the evaluation's figures as `samples`
(a list of {prompt, completion}); `tunelab.training.metrics.MetricsLog` writes them to
`samples.jsonl` with the step and sends them to the trackers as text.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from tunelab.data.dataset import prompt_and_reference
from tunelab.data.formats import Conversation
from tunelab.data.tokenize import adds_bos, encode_prompt
from tunelab.generation import generate
from tunelab.training.setup import Run


def with_samples(run: Run, evaluate: Callable[[], dict] | None, template: str) -> Callable[[], dict] | None:
    """`evaluate` (or no evaluation at all) with the answers to `eval.sample_prompts` added to its
    figures as `samples`; `evaluate` itself when there are no sample prompts."""
    if not run.config.eval.sample_prompts:
        return evaluate
    return partial(evaluate_with_samples, run, evaluate, template)


def evaluate_with_samples(run: Run, evaluate: Callable[[], dict] | None, template: str) -> dict:
    """The figures of `evaluate` (none without it) and `samples`."""
    figures = evaluate() if evaluate is not None else {}
    return {**figures, "samples": generate_samples(run, template)}


def sample_prompt_ids(run: Run, prompt: str, template: str) -> list[int]:
    """Token ids of `prompt` rendered as a generation prompt (module docstring)."""
    tokenizer = run.tokenizer
    if template == "text":
        return encode_prompt(prompt, tokenizer, add_special_tokens=adds_bos(tokenizer))
    system = [("system", run.config.data.system_prompt)] if run.config.data.system_prompt else []
    conversation = Conversation(
        system + [("user", prompt), ("assistant", "")], {"instruction": prompt, "input": ""}
    )
    return prompt_and_reference(conversation, tokenizer, template)[0]


def generate_samples(run: Run, template: str) -> list[dict]:
    """Greedy answers to `eval.sample_prompts`: [{prompt, completion}] in their order."""
    cfg = run.config.eval
    prompts = [sample_prompt_ids(run, prompt, template) for prompt in cfg.sample_prompts]
    responses = generate(
        run.model, run.tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size, {"do_sample": False}
    )
    return [
        {"prompt": prompt, "completion": text}
        for prompt, text in zip(cfg.sample_prompts, responses.texts, strict=True)
    ]

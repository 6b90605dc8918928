"""`tunelab generate RUN_OR_MODEL [--prompt TEXT]`: one answer, or an interactive chat."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tunelab.commands.arguments import TRAINED_PATH_HELP, add_load_options, add_template_option

HELP = "answer a prompt, or chat interactively, with a run, model or adapter"
DESCRIPTION = (
    "Without --prompt, starts an interactive chat (empty line or Ctrl-D ends it; "
    "'/reset' clears the history). Prompts are rendered with the run's template; an answer ends "
    "at the tokenizer's or the model's generation-config end-of-sequence token."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help=TRAINED_PATH_HELP)
    parser.add_argument("--prompt", help="the instruction (omit for an interactive chat)")
    parser.add_argument("--input", default="", help="optional input/context for the instruction")
    add_template_option(parser, "the run's, else auto")
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    add_load_options(parser)


def answer(model, tokenizer, turns, template, extra, args) -> str:
    """Generate the assistant's next turn after `turns`."""
    from tunelab.data.dataset import prompt_and_reference
    from tunelab.data.formats import Conversation
    from tunelab.evaluate import generate_responses

    conv = Conversation(turns + [("assistant", "")], extra)
    prompt_ids, _ = prompt_and_reference(conv, tokenizer, template)
    sampling = args.temperature > 0
    return generate_responses(
        model,
        tokenizer,
        [prompt_ids],
        args.max_new_tokens,
        1,
        sampling,
        max(args.temperature, 1e-5),
        args.top_p,
    )[0].strip()


def run(args) -> int:
    import torch

    from tunelab.data.templates import choose_template
    from tunelab.runinfo import run_data_config
    from tunelab.trained import load_trained

    torch.manual_seed(args.seed)
    model, tokenizer, _ = load_trained(args.path, dtype=args.dtype, device=args.device)
    saved = run_data_config(Path(args.path))
    template = choose_template(args.template or (saved.template if saved else "auto"), tokenizer)
    system = [("system", args.system)] if args.system else []
    if args.prompt is not None:
        user = args.prompt if not args.input else f"{args.prompt}\n\n{args.input}"
        extra = {"instruction": args.prompt, "input": args.input}
        print(answer(model, tokenizer, system + [("user", user)], template, extra, args))
        return 0
    turns = list(system)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or not line.strip():
            return 0
        if line.strip() == "/reset":
            turns = list(system)
            continue
        turns.append(("user", line.strip()))
        reply = answer(model, tokenizer, turns, template, {}, args)
        turns.append(("assistant", reply))
        print(f"model> {reply}" if interactive else reply, flush=True)

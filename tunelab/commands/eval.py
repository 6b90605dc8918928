"""`tunelab eval RUN_OR_MODEL [--data FILE]`: eval loss, perplexity and exact match, or the figures
of preference pairs (`tunelab.evaluate_pairs`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from tunelab.commands.arguments import (
    TRAINED_PATH_HELP,
    add_load_options,
    add_records_options,
    add_template_option,
)

HELP = "evaluate a run, model folder or adapter: loss, perplexity, exact match; or preference pairs"
DESCRIPTION = (
    "Evaluate on held-out data: per-token loss, perplexity and, for instruction/chat data, "
    "the exact-match accuracy of greedy generations against the reference responses. Preference "
    "pairs (prompt, chosen, rejected) give the mean log-probs of both responses and how often the "
    "chosen one is the likelier; a DPO run's also its own held-out loss, margin and accuracy. A PPO "
    "or GRPO run gives the rewards of its greedy answers to its held-out prompts. With a "
    "run folder and no --data, the run's own held-out data is used (data.eval, or the "
    "data.eval_fraction split drawn again with the run's seed)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help=TRAINED_PATH_HELP)
    parser.add_argument("--data", help="eval data file or hub data set (default: the run's eval data)")
    add_records_options(parser, "evaluate")
    parser.add_argument("--format", default=None, help="record format (default: the run's, else auto)")
    add_template_option(parser, "the run's, else auto")
    parser.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="truncate examples to this many tokens (default: the run's, else 2048)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--no-generate", action="store_true", help="skip the exact-match generation")
    add_load_options(parser)
    parser.add_argument("--show", type=int, default=0, help="print this many generations")


def run(args) -> int:
    from tunelab.data.dataset import prepare_data
    from tunelab.data.formats import PairRecordsError
    from tunelab.errors import TunelabError
    from tunelab.runinfo import run_config
    from tunelab.trained import load_trained

    config = run_config(Path(args.path))
    if config is not None and config.objective.name == "reward":
        raise TunelabError(
            f"{args.path} is a reward model (objective reward): score pairs or responses with "
            f"`tunelab score {args.path} --data FILE`"
        )
    cfg, held_out = eval_data_config(args, config)
    seed = config.train.seed if config is not None else 0
    model, tokenizer, method = load_trained(args.path, dtype=args.dtype, device=args.device)
    result = {"path": args.path, "method": method}
    online = config is not None and config.objective.name in ("ppo", "grpo")
    own_pairs = config is not None and config.objective.name == "dpo" and not args.data
    if online and args.format in (None, "prompt"):  # its prompts, scored as the run scored them
        result.update(evaluate_prompts(args, cfg, held_out, seed, config, model, tokenizer))
    elif cfg.format == "preference" or (cfg.format == "auto" and own_pairs):
        result.update(evaluate_pairs(args, cfg, held_out, seed, config, model, tokenizer, method))
    else:
        try:
            data = prepare_data(cfg, tokenizer, seed=seed, role="training" if held_out else "eval")
        except PairRecordsError:
            if cfg.format != "auto":
                raise
            # the records are preference pairs: they are evaluated as pairs
            result.update(evaluate_pairs(args, cfg, held_out, seed, config, model, tokenizer, method))
        else:
            result.update(evaluate_records(args, data, held_out, model, tokenizer))
    print(json.dumps(result, indent=2))
    return 0


def evaluate_records(args, data, held_out: bool, model, tokenizer) -> dict:
    """Per-token loss and perplexity of the records, and for instruction, chat and prompt/completion
    records the exact match of greedy answers (`--show` prints the first few)."""
    from tunelab.evaluate import evaluate_loss, exact_match

    show_notes(data.notes)
    split = data.eval if held_out else data.train
    examples, conversations = split.examples[: args.limit], split.conversations[: args.limit]
    result = {"records": len(examples)}
    result.update(evaluate_loss(model, examples, tokenizer.pad_token_id, args.batch_size))
    if not args.no_generate and data.format in ("instruction", "chat", "prompt_completion"):
        accuracy, generations = exact_match(
            model, tokenizer, conversations, data.template, args.max_new_tokens, args.batch_size
        )
        result["exact_match"] = accuracy
        for g in generations[: args.show]:
            print(f"--- reference: {g.reference!r}\n    generated: {g.output!r}")
    return result


def show_notes(notes: list[str]) -> None:
    """The data report's lines, as training prints them."""
    from tunelab.console import note

    for line in notes:
        note(f"[tunelab] data: {line}")


def eval_data_config(args, config) -> tuple:
    """(the data to read, whether its held-out split is the one evaluated). `--data` or the run's
    `data.eval` is read whole; a run that held out `data.eval_fraction` of its training data is
    evaluated on that split, drawn again with the run's seed. Rendering (template, system prompt,
    chat template, max_length) is the run's unless an option overrides it; so is the split of a
    hub data set, unless --data names another source."""
    from tunelab.config import DataConfig
    from tunelab.errors import TunelabError

    saved = config.data if config is not None else None
    source = args.data or (saved.eval if saved else None)
    if not source and not (saved and saved.eval_fraction > 0):
        raise TunelabError(
            f"no eval data for {args.path}: it is not a run with data.eval or data.eval_fraction set; "
            "pass --data FILE"
        )
    held_out = not source
    base = saved if saved is not None else DataConfig(train=source, max_length=2048)
    return dataclasses.replace(
        base,
        train=base.train if held_out else source,
        split=args.split if args.data else (base.split if held_out else base.eval_split or base.split),
        eval=None if not held_out else base.eval,
        eval_split=None if not held_out else base.eval_split,
        eval_fraction=base.eval_fraction if held_out else 0.0,
        format=args.format or base.format,
        template=args.template or base.template,
        max_length=args.max_length or base.max_length,
        max_records=args.limit if not held_out else base.max_records,
    ), held_out


def evaluate_pairs(args, cfg, held_out: bool, seed: int, config, model, tokenizer, method: str) -> dict:
    """Figures of preference pairs (`tunelab.evaluate_pairs`): the ranking by the model's log-probs,
    and for a DPO run the run's own held-out loss, margin and accuracy."""
    from tunelab.data.preference import prepare_preferences
    from tunelab.evaluate_pairs import dpo_reference, pair_figures

    data = prepare_preferences(dataclasses.replace(cfg, format="preference"), tokenizer, seed=seed)
    show_notes(data.notes)
    pairs = (data.eval if held_out else data.train)[: args.limit]
    dpo = None
    if config is not None and config.objective.name == "dpo":
        dpo = (dpo_reference(model, method, config), config.objective.options)
    return {"pairs": len(pairs), **pair_figures(model, pairs, tokenizer.pad_token_id, args.batch_size, dpo)}


def evaluate_prompts(args, cfg, held_out: bool, seed: int, config, model, tokenizer) -> dict:
    """A PPO or GRPO run on its own held-out prompts: the mean reward of greedy answers, each
    reward's mean and the answers' length (`tunelab.rl.online.held_out_rewards`), scored by the
    run's reward functions and reward model, as the run measured them before and after training."""
    from tunelab.data.preference import prepare_prompts
    from tunelab.rl.online import held_out_rewards
    from tunelab.rl.rewards import Rewards

    data = prepare_prompts(cfg, tokenizer, seed=seed)
    show_notes(data.notes)
    prompts = (data.eval if held_out else data.train)[: args.limit]
    options = config.objective.options
    device = next(model.parameters()).device
    rewards = Rewards(
        options.reward_functions,
        options.reward_weights,
        options.reward_model,
        tokenizer,
        data.template,
        device,
        args.dtype,
    )
    answer = "response" if config.objective.name == "ppo" else "completion"
    figures = held_out_rewards(model, tokenizer, prompts, rewards, options, args.batch_size, answer)
    return {"prompts": len(prompts), **figures}

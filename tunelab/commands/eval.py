"""`tunelab eval RUN_OR_MODEL [--data FILE]`: eval loss, perplexity and exact match."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tunelab.commands.arguments import (
    TRAINED_PATH_HELP,
    add_load_options,
    add_records_options,
    add_template_option,
)

HELP = "evaluate a run, model folder or adapter: loss, perplexity, exact match"
DESCRIPTION = (
    "Evaluate on held-out data: per-token loss, perplexity and, for instruction/chat data, "
    "the exact-match accuracy of greedy generations against the reference responses. With a run "
    "folder and no --data, the run's own eval data is used."
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
    from tunelab.config import DataConfig
    from tunelab.console import note
    from tunelab.data.dataset import prepare_data
    from tunelab.errors import TunelabError
    from tunelab.evaluate import evaluate_loss, exact_match
    from tunelab.runinfo import run_data_config
    from tunelab.trained import load_trained

    saved = run_data_config(Path(args.path))
    data_source = args.data or (saved.eval if saved else None)
    if not data_source:
        raise TunelabError(
            f"no eval data for {args.path}: it is not a run with data.eval set; pass --data FILE"
        )
    cfg = DataConfig(
        train=data_source,
        split=args.split,
        format=args.format or (saved.format if saved else "auto"),
        template=args.template or (saved.template if saved else "auto"),
        max_length=args.max_length or (saved.max_length if saved else 2048),
        max_records=args.limit,
    )
    model, tokenizer, method = load_trained(args.path, dtype=args.dtype, device=args.device)
    data = prepare_data(cfg, tokenizer, role="eval")
    for line in data.notes:
        note(f"[tunelab] data: {line}")
    result = {"path": args.path, "method": method, "records": len(data.train.examples)}
    result.update(evaluate_loss(model, data.train.examples, tokenizer.pad_token_id, args.batch_size))
    if not args.no_generate and data.format in ("instruction", "chat", "prompt_completion"):
        accuracy, generations = exact_match(
            model, tokenizer, data.train.conversations, data.template, args.max_new_tokens, args.batch_size
        )
        result["exact_match"] = accuracy
        for g in generations[: args.show]:
            print(f"--- reference: {g.reference!r}\n    generated: {g.output!r}")
    print(json.dumps(result, indent=2))
    return 0

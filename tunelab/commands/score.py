"""`tunelab score REWARD_MODEL --data FILE` or `--prompt TEXT --response TEXT`: rewards from a trained reward model.

With `--data`, each record is scored and printed as one JSON line:

- preference pairs (`prompt`/`chosen`/`rejected`, as for training): `{"record", "chosen", "rejected"}`,
  then a summary line with the pairwise accuracy and the mean margin;
- single responses (`prompt` + `completion` or `response`, `messages`, or instruction records):
  `{"record", "reward"}`, then a summary line with the mean reward.

Prompts are rendered with the template the reward model was trained with (`--template` overrides).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tunelab.commands.arguments import add_load_options, add_records_options, add_template_option

HELP = "score responses (or preference pairs) with a trained reward model"
DESCRIPTION = (
    "Score responses with a reward model trained by `objective: reward`: one response "
    "(--prompt/--response), or every record of a data file (--data), printed as JSON lines."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="reward-model run folder or its final/ folder")
    parser.add_argument("--data", help="records to score: preference pairs or prompt + response records")
    parser.add_argument("--prompt", help="the prompt (with --response)")
    parser.add_argument("--response", help="the response to score (with --prompt)")
    add_records_options(parser, "score")
    add_template_option(parser, "the reward model's")
    parser.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="truncate sequences to this many tokens (default: the reward run's data.max_length, else 2048)",
    )
    add_load_options(parser)


def _single_conversation(record: dict, source: str, number: int):
    """A prompt + response record as a `Conversation` ending with the response."""
    from tunelab.data.formats import detect_format, to_conversation
    from tunelab.errors import DataError

    if "response" in record and "completion" not in record and "instruction" not in record:
        record = {**record, "completion": record["response"]}
    fmt = detect_format(record)
    if fmt not in ("prompt_completion", "chat", "instruction"):
        raise DataError(
            source, number, None, "expected prompt + completion/response, messages, or chosen/rejected"
        )
    return to_conversation(record, fmt, source, number)


class Scorer:
    """A reward model with what scoring needs: the template, the tokenizer, the batch size."""

    def __init__(self, args):
        from tunelab.data.templates import choose_template
        from tunelab.data.tokenize import adds_bos
        from tunelab.rl.reward_model import load_reward_model
        from tunelab.runinfo import run_data_config

        self.model = load_reward_model(Path(args.path), dtype=args.dtype, device=args.device)
        self.tokenizer = self.model.tokenizer
        self.template = choose_template(args.template or self.model.template or "auto", self.tokenizer)
        self.add_special = self.template != "chat" and adds_bos(self.tokenizer)
        saved = run_data_config(Path(args.path))
        self.max_length = args.max_length or (saved.max_length if saved else 2048)
        self.batch_size = args.batch_size

    def encode(self, conversation):
        """A conversation ending with the response, rendered and tokenised."""
        from tunelab.data.templates import render_segments
        from tunelab.data.tokenize import encode_segments

        segments = render_segments(conversation, self.tokenizer, self.template)
        return encode_segments(segments, self.tokenizer, self.max_length, False, self.add_special)

    def scores(self, examples) -> list[float]:
        """The reward of each tokenised example, in batches."""
        from tunelab.data.collate import pad_batch

        out = []
        for start in range(0, len(examples), self.batch_size):
            batch = pad_batch(examples[start : start + self.batch_size], self.tokenizer.pad_token_id)
            out += self.model.score(batch["input_ids"], batch["attention_mask"]).tolist()
        return out


def run(args) -> int:
    from tunelab.data.formats import Conversation
    from tunelab.data.sources import read_records
    from tunelab.errors import TunelabError

    if (args.data is None) == (args.prompt is None):
        raise TunelabError("give either --data FILE or --prompt TEXT --response TEXT")
    if args.prompt is not None and args.response is None:
        raise TunelabError("--prompt needs --response")
    scorer = Scorer(args)
    if args.prompt is not None:
        conv = Conversation([("user", args.prompt), ("assistant", args.response)])
        print(f"{scorer.scores([scorer.encode(conv)])[0]:.6f}")
        return 0
    records, _ = read_records(args.data, args.split)
    records = records[: args.limit] if args.limit is not None else records
    if {"chosen", "rejected"} <= set(records[0][1]):
        summary = _score_pairs(scorer, records, args.data)
    else:
        summary = _score_responses(scorer, records, args.data)
    print(json.dumps({"summary": summary}))
    return 0


def _score_pairs(scorer: Scorer, records: list[tuple[int, dict]], source: str) -> dict:
    """Print each pair's rewards as a JSON line; returns the pairwise accuracy and mean margin."""
    from tunelab.data.preference import encode_pair, to_preference_pair
    from tunelab.errors import TunelabError

    numbers, examples = [], []
    for number, record in records:
        pair = encode_pair(
            to_preference_pair(record, source, number), scorer.tokenizer, scorer.template, scorer.max_length
        )
        if pair is None:
            raise TunelabError(f"{source}, record {number}: a response is cut away by --max-length")
        numbers.append(number)
        examples.append(pair)
    chosen = scorer.scores([p.chosen for p in examples])
    rejected = scorer.scores([p.rejected for p in examples])
    for number, c, r in zip(numbers, chosen, rejected, strict=True):
        print(json.dumps({"record": number, "chosen": c, "rejected": r}))
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    return {
        "pairs": len(margins),
        "accuracy": sum(m > 0 for m in margins) / len(margins),
        "mean_margin": sum(margins) / len(margins),
    }


def _score_responses(scorer: Scorer, records: list[tuple[int, dict]], source: str) -> dict:
    """Print each response's reward as a JSON line; returns the mean reward."""
    convs = [(number, _single_conversation(record, source, number)) for number, record in records]
    rewards = scorer.scores([scorer.encode(conv) for _, conv in convs])
    for (number, _), reward in zip(convs, rewards, strict=True):
        print(json.dumps({"record": number, "reward": reward}))
    return {"records": len(rewards), "mean_reward": sum(rewards) / len(rewards)}

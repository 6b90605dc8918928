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


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "score",
        help="score responses (or preference pairs) with a trained reward model",
        description="Score responses with a reward model trained by `objective: reward`: one response "
        "(--prompt/--response), or every record of a data file (--data), printed as JSON lines.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("path", help="reward-model run folder or its final/ folder")
    parser.add_argument("--data", help="records to score: preference pairs or prompt + response records")
    parser.add_argument("--prompt", help="the prompt (with --response)")
    parser.add_argument("--response", help="the response to score (with --prompt)")
    parser.add_argument("--split", default="train", help="split of a hub data set")
    parser.add_argument("--template", default=None, help="alpaca or chat (default: the reward model's)")
    parser.add_argument("--max-length", type=int, default=2048, help="truncate sequences to this many tokens")
    parser.add_argument("--limit", type=int, default=None, help="score at most this many records")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="auto")
    parser.set_defaults(func=run)


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


def run(args) -> int:
    from tunelab.data.collate import pad_batch
    from tunelab.data.formats import Conversation
    from tunelab.data.preference import encode_pair, to_preference_pair
    from tunelab.data.sources import read_records
    from tunelab.data.templates import choose_template, render_segments
    from tunelab.data.tokenize import adds_bos, encode_segments
    from tunelab.errors import TunelabError
    from tunelab.rl.reward_model import load_reward_model

    if (args.data is None) == (args.prompt is None):
        raise TunelabError("give either --data FILE or --prompt TEXT --response TEXT")
    if args.prompt is not None and args.response is None:
        raise TunelabError("--prompt needs --response")
    reward_model = load_reward_model(Path(args.path), dtype=args.dtype, device=args.device)
    tokenizer = reward_model.tokenizer
    template = choose_template(args.template or reward_model.template, tokenizer)
    add_special = template != "chat" and adds_bos(tokenizer)

    def encode(conv: Conversation):
        return encode_segments(
            render_segments(conv, tokenizer, template), tokenizer, args.max_length, False, add_special
        )

    def scores(examples) -> list[float]:
        out = []
        for start in range(0, len(examples), args.batch_size):
            batch = pad_batch(examples[start : start + args.batch_size], tokenizer.pad_token_id)
            out += reward_model.score(batch["input_ids"], batch["attention_mask"]).tolist()
        return out

    if args.prompt is not None:
        conv = Conversation([("user", args.prompt), ("assistant", args.response)])
        print(f"{scores([encode(conv)])[0]:.6f}")
        return 0

    records, _ = read_records(args.data, args.split)
    records = records[: args.limit] if args.limit is not None else records
    if {"chosen", "rejected"} <= set(records[0][1]):
        numbers, examples = [], []
        for number, record in records:
            pair = encode_pair(
                to_preference_pair(record, args.data, number), tokenizer, template, args.max_length
            )
            if pair is None:
                raise TunelabError(f"{args.data}, record {number}: a response is cut away by --max-length")
            numbers.append(number)
            examples.append(pair)
        chosen = scores([p.chosen for p in examples])
        rejected = scores([p.rejected for p in examples])
        for number, c, r in zip(numbers, chosen, rejected, strict=True):
            print(json.dumps({"record": number, "chosen": c, "rejected": r}))
        margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
        summary = {
            "pairs": len(margins),
            "accuracy": sum(m > 0 for m in margins) / len(margins),
            "mean_margin": sum(margins) / len(margins),
        }
    else:
        convs = [(number, _single_conversation(record, args.data, number)) for number, record in records]
        rewards = scores([encode(conv) for _, conv in convs])
        for (number, _), reward in zip(convs, rewards, strict=True):
            print(json.dumps({"record": number, "reward": reward}))
        summary = {"records": len(rewards), "mean_reward": sum(rewards) / len(rewards)}
    print(json.dumps({"summary": summary}))
    return 0

"""Generate the bundled RLHF demo sets in data/rlhf/ from the demo tasks (tunelab/demo_data.py).

- preference_{train,eval}.jsonl: `prompt`, `instruction`, `input`, `chosen` (the correct answer),
  `rejected` (a wrong one: half the time of the wrong kind, a word for a number or a number for
  words; else plausible: the words unreversed or shuffled, another word of the input, a count or
  sum off by one to three, the text once or three times instead of twice);
- prompts_{train,eval}.jsonl: `prompt`, `instruction`, `input`, `answer` (for reward functions
  such as `tunelab.rl.rewards:exact_answer`).

`instruction` and `input` let the alpaca template render the prompt exactly as SFT on data/demo
does. The held-out splits share no (instruction, input) with their training splits. Deterministic:
rerunning the script rewrites the same files.

    python scripts/make_rlhf_data.py [--pairs 1000] [--prompts 1000] [--eval 200] [--out data/rlhf]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from tunelab.demo_data import WORDS, generate

PAIR_SEED, PROMPT_SEED = 11, 12


def wrong_answer(record: dict, rng: random.Random) -> str:
    """A wrong answer to a demo record: half the time one of the wrong kind (a word where a number
    is asked, a number where words are), else a plausible one of the right kind."""
    instruction, words, right = record["instruction"], record["input"].split(), record["output"]
    if rng.random() < 0.5:
        return rng.choice(WORDS) if right.isdigit() else str(rng.randint(0, 18))
    candidates: list[str] = []
    if instruction.startswith("What is") and "plus" in instruction:
        candidates = [str(int(right) + d) for d in (-3, -2, -1, 1, 2, 3) if int(right) + d >= 0]
    elif instruction.startswith("Reverse"):
        shuffled = words[:]
        rng.shuffle(shuffled)
        candidates = [" ".join(words), " ".join(shuffled)]
    elif instruction.startswith("What is the first") or instruction.startswith("What is the last"):
        candidates = [w for w in words if w != right] + [rng.choice([w for w in WORDS if w not in words])]
    elif instruction.startswith("How many"):
        candidates = [str(len(words) + d) for d in (-2, -1, 1, 2) if len(words) + d >= 1]
    elif instruction.startswith("Repeat"):
        candidates = [" ".join(words), " ".join(words * 3)]
    candidates = [c for c in candidates if c != right]
    return rng.choice(candidates)


def prompt_text(record: dict) -> str:
    """The user turn of a demo record, as the instruction format builds it."""
    return record["instruction"] if not record["input"] else f"{record['instruction']}\n\n{record['input']}"


def preference_records(records: list[dict], seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "prompt": prompt_text(r),
            "instruction": r["instruction"],
            "input": r["input"],
            "chosen": r["output"],
            "rejected": wrong_answer(r, rng),
        }
        for r in records
    ]


def prompt_records(records: list[dict]) -> list[dict]:
    return [
        {
            "prompt": prompt_text(r),
            "instruction": r["instruction"],
            "input": r["input"],
            "answer": r["output"],
        }
        for r in records
    ]


def build(n_pairs: int, n_prompts: int, n_eval: int) -> dict[str, list[dict]]:
    """File name -> records."""
    pair_train, pair_eval = generate(n_pairs, n_eval, seed=PAIR_SEED)
    prompt_train, prompt_eval = generate(n_prompts, n_eval, seed=PROMPT_SEED)
    return {
        "preference_train.jsonl": preference_records(pair_train, PAIR_SEED),
        "preference_eval.jsonl": preference_records(pair_eval, PAIR_SEED + 100),
        "prompts_train.jsonl": prompt_records(prompt_train),
        "prompts_eval.jsonl": prompt_records(prompt_eval),
    }


def write(out: Path, n_pairs: int = 1000, n_prompts: int = 1000, n_eval: int = 200) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in build(n_pairs, n_prompts, n_eval).items():
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--eval", type=int, default=200)
    parser.add_argument("--out", default="data/rlhf")
    args = parser.parse_args()
    write(Path(args.out), args.pairs, args.prompts, args.eval)
    print(f"wrote {args.pairs} + {args.eval} pairs and {args.prompts} + {args.eval} prompts to {args.out}")


if __name__ == "__main__":
    main()

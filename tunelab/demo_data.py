"""Generate the bundled demo instruction data set (data/demo/train.jsonl, data/demo/eval.jsonl).

Six task types whose answers can be checked exactly, in Alpaca's field names (instruction, input,
output); some carry an input, some do not:

- reverse the words of the input        "red fox runs"  -> "runs fox red"
- first word of the input               "red fox runs"  -> "red"
- last word of the input                "red fox runs"  -> "runs"
- count the words of the input          "red fox runs"  -> "3"
- repeat the input twice                "red fox"       -> "red fox red fox"
- add two numbers (no input)            "What is 3 plus 4?" -> "7"

The held-out split shares no (instruction, input) pair with the training split. Deterministic:
rerunning the script rewrites the same files.

    python scripts/make_demo_data.py [--train 4000] [--eval 300] [--out data/demo]

(`scripts/make_demo_data.py` calls `main` here; tests use `generate` for small sets.)
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

WORDS = (
    "apple bird blue boat book bread cake car cat chair cloud coat cold cow cup desk dog door duck egg "
    "farm fish flag frog gold green hat hill horse house ice jam key king lake lamp leaf lion map milk "
    "moon mouse nest night oak owl paper park pear pen pig pink plum queen rain red ring river road rock "
    "rose salt sand ship shoe sky snow sock star stone sun table tea tent tiger tree van wall water whale "
    "wind wolf wood yard zebra"
).split()

TASKS = {
    "reverse": ("Reverse the order of the words.", lambda ws: " ".join(reversed(ws))),
    "first": ("What is the first word?", lambda ws: ws[0]),
    "last": ("What is the last word?", lambda ws: ws[-1]),
    "count": ("How many words are there?", lambda ws: str(len(ws))),
    "repeat": ("Repeat the text twice.", lambda ws: " ".join(ws + ws)),
}


def make_record(rng: random.Random) -> dict:
    kind = rng.choice([*TASKS, "add"])
    if kind == "add":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return {"instruction": f"What is {a} plus {b}?", "input": "", "output": str(a + b)}
    instruction, answer = TASKS[kind]
    n = rng.randint(2, 3) if kind == "repeat" else rng.randint(2, 5)
    words = rng.sample(WORDS, n)
    return {"instruction": instruction, "input": " ".join(words), "output": answer(words)}


def generate(n_train: int, n_eval: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Distinct records: the eval split shares no (instruction, input) with train."""
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    records = []
    while len(records) < n_train + n_eval:
        record = make_record(rng)
        key = (record["instruction"], record["input"])
        if key in seen:
            continue
        seen.add(key)
        records.append(record)
    return records[:n_train], records[n_train:]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--eval", type=int, default=300)
    parser.add_argument("--out", default="data/demo")
    args = parser.parse_args()
    train, held_out = generate(args.train, args.eval)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("eval", held_out)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(train)} train and {len(held_out)} eval records to {out}")


if __name__ == "__main__":
    main()

"""The benchmark workload, built offline and deterministically: tokenizer, data set, model.

- Data: Alpaca-like instruction records (`instruction`, `input` in 40% of them, `output`) in a
  synthetic language: pseudo-words drawn from a Zipfian first-order Markov chain, so a model can
  learn something and the loss falls. Lengths follow Alpaca's shape: short instructions, optional
  inputs, log-normal outputs with a long tail, so that random batches of 8 are ~44% padding at
  max length 512 (printed by `python -m benchmarks.workload`).
- Tokenizer: `tunelab.tiny.build_tokenizer` (byte-level BPE), vocab 8192, trained on the data.
- Models: Llama-architecture configs with random weights (seeded), saved with `save_pretrained`:
  `small` (31.6M parameters), `smollm` (SmolLM-135M's shape), `qwen05b` (Qwen2-0.5B's shape, GPU).

Both trainers read the same records: tunelab the `instruction/input/output` file with its alpaca
template, TRL a prompt/completion file holding the same rendered prompt and `output + eos`.
Everything lands in a cache folder, built once (`build(cache)` returns the paths).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

SHAPES = {
    # hidden, layers, heads, kv heads, intermediate, vocab, tied embeddings, architecture
    "small": dict(
        arch="llama", hidden=512, layers=8, heads=8, kv_heads=4, intermediate=1376, vocab=8192, tie=False
    ),
    "smollm": dict(
        arch="llama", hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152, tie=True
    ),
    "qwen05b": dict(
        arch="qwen2", hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936, tie=True
    ),
}

NUM_RECORDS = 4000
EVAL_RECORDS = 64


@dataclass
class Workload:
    root: Path
    model_dir: Path
    train_alpaca: Path
    """Records with instruction/input/output (tunelab, alpaca template)."""
    train_trl: Path
    """The same records rendered as prompt/completion (TRL)."""
    eval_alpaca: Path
    """Held-out records, for the common eval loss after training."""


def _words(rng: random.Random, count: int) -> list[str]:
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "sh", "qu", "ng"]
    words = set()
    while len(words) < count:
        n = rng.choice((1, 1, 2, 2, 2, 3, 3, 4))
        words.add("".join(rng.choice(syllables) for _ in range(n)))
    return sorted(words)


class Language:
    """A Zipfian first-order Markov chain over pseudo-words: each word has 12 likely successors."""

    def __init__(self, rng: random.Random, vocab: int = 4000):
        self.words = _words(rng, vocab)
        weights = [1.0 / (i + 1) ** 1.05 for i in range(vocab)]
        self.rng = rng
        self.successors = [rng.choices(range(vocab), weights=weights, k=12) for _ in range(vocab)]
        self.start = rng.choices(range(vocab), weights=weights, k=200)

    def sentence(self, n: int) -> str:
        rng = self.rng
        w = rng.choice(self.start)
        out = []
        for i in range(n):
            out.append(self.words[w])
            w = rng.choice(self.successors[w]) if rng.random() < 0.85 else rng.choice(self.start)
            if i % 11 == 10 and i + 1 < n:
                out[-1] += rng.choice((",", ".", ".", ";"))
        text = " ".join(out)
        return text[0].upper() + text[1:] + rng.choice((".", ".", "?", "!"))

    def paragraph(self, n: int) -> str:
        parts, left = [], n
        while left > 0:
            k = min(left, self.rng.randint(6, 18))
            parts.append(self.sentence(k))
            left -= k
        return " ".join(parts)


def records(seed: int = 0, count: int = NUM_RECORDS) -> list[dict]:
    """Alpaca-like records (deterministic for a seed)."""
    rng = random.Random(seed)
    lang = Language(rng)
    rows = []
    for _ in range(count):
        instruction = lang.sentence(rng.randint(5, 22))
        inp = lang.paragraph(int(rng.lognormvariate(math.log(18), 0.7))) if rng.random() < 0.4 else ""
        out_words = max(1, int(rng.lognormvariate(math.log(45), 0.58)))
        rows.append({"instruction": instruction, "input": inp, "output": lang.paragraph(out_words)})
    return rows


def alpaca_prompt(row: dict) -> str:
    """The prompt exactly as tunelab's alpaca template renders it."""
    if row["input"].strip():
        return f"### Instruction:\n{row['instruction']}\n\n### Input:\n{row['input']}\n\n### Response:\n"
    return f"### Instruction:\n{row['instruction']}\n\n### Response:\n"


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def build(cache: str | Path, shape: str = "small", seed: int = 0) -> Workload:
    """Build (or reuse) the tokenizer, data files and the model of `shape` under `cache`."""
    cache = Path(cache)
    root = cache / "data"
    tok_dir = cache / "tokenizer"
    if not (root / "eval.jsonl").exists():
        root.mkdir(parents=True, exist_ok=True)
        rows = records(seed, NUM_RECORDS + EVAL_RECORDS)
        train, held = rows[:NUM_RECORDS], rows[NUM_RECORDS:]
        _write_jsonl(root / "train.jsonl", train)
        _write_jsonl(root / "eval.jsonl", held)
    if not (tok_dir / "tokenizer.json").exists():
        from tunelab.tiny import build_tokenizer

        rows = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()]
        corpus = [alpaca_prompt(r) + r["output"] for r in rows]
        build_tokenizer(corpus, vocab_size=8192).save_pretrained(tok_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    if not (root / "train_trl.jsonl").exists():
        rows = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()]
        # TRL appends eos to completions itself when it is missing; we give it explicitly.
        _write_jsonl(
            root / "train_trl.jsonl",
            [{"prompt": alpaca_prompt(r), "completion": r["output"] + tokenizer.eos_token} for r in rows],
        )
    model_dir = cache / f"model-{shape}"
    if not (model_dir / "config.json").exists():
        _build_model(model_dir, shape, tokenizer, seed)
    return Workload(cache, model_dir, root / "train.jsonl", root / "train_trl.jsonl", root / "eval.jsonl")


def model_config(shape: str, tokenizer):
    """The transformers config of `shape`, with the tokenizer's special ids (vocab from the shape)."""
    from tunelab.tiny import tiny_config

    s = SHAPES[shape]
    config = tiny_config(
        s["arch"],
        vocab_size=max(s["vocab"], len(tokenizer)),
        hidden=s["hidden"],
        layers=s["layers"],
        heads=s["heads"],
        kv_heads=s["kv_heads"],
        intermediate=s["intermediate"],
        max_positions=2048,
        tie_embeddings=s["tie"],
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return config


def _build_model(out: Path, shape: str, tokenizer, seed: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config(shape, tokenizer), dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def length_stats(workload: Workload, max_length: int = 512, batch_size: int = 8, seed: int = 0) -> dict:
    """Token lengths of the tunelab-tokenised training set and the padding of random batches."""
    from tunelab.config import DataConfig
    from tunelab.data.dataset import prepare_data
    from tunelab.models import load_tokenizer

    tokenizer = load_tokenizer(str(workload.model_dir))
    data = prepare_data(
        DataConfig(train=str(workload.train_alpaca), max_length=max_length, template="alpaca"), tokenizer
    )
    lengths = [len(e.input_ids) for e in data.train.examples]
    targets = [e.num_targets for e in data.train.examples]
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    real = padded = 0
    for i in range(0, len(order) - batch_size + 1, batch_size):
        batch = [lengths[j] for j in order[i : i + batch_size]]
        real += sum(batch)
        padded += max(batch) * len(batch)
    lengths_sorted = sorted(lengths)
    return {
        "examples": len(lengths),
        "mean_tokens": sum(lengths) / len(lengths),
        "median_tokens": lengths_sorted[len(lengths) // 2],
        "p95_tokens": lengths_sorted[int(0.95 * len(lengths))],
        "max_tokens": lengths_sorted[-1],
        "truncated": data.train.truncated,
        "target_fraction": sum(targets) / sum(lengths),
        "padding_fraction_random_batches": 1 - real / padded,
    }


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default="benchmarks/.cache")
    parser.add_argument("--shape", default="small", choices=sorted(SHAPES))
    args = parser.parse_args()
    w = build(args.cache, args.shape)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in length_stats(w).items()}))

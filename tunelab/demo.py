"""The offline demo: fine-tune a small model on the bundled instruction data and show it learned.

The base model is built deterministically at first run and cached in `.cache/demo-model/`: a
Llama-architecture model (hidden 128, 4 layers, about 1.2M parameters) with random weights and a
byte-level BPE tokenizer trained on the demo data. Nothing is downloaded. The demo evaluates the
base model (eval loss, exact-match accuracy of greedy answers on the held-out split), trains with
the given config, evaluates again and prints a before/after table; the loss curve is in
`OUTPUT_DIR/loss.png`.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunelab.tiny import build_tiny_model_dir, build_tokenizer

DEMO_DATA = Path("data/demo")
DEMO_MODEL = Path(".cache/demo-model")
DEMO_SIZES = {
    "hidden": 128,
    "layers": 4,
    "heads": 4,
    "kv_heads": 2,
    "intermediate": 384,
    "max_positions": 256,
}


def demo_corpus(data_dir: Path = DEMO_DATA) -> list[str]:
    """Every text field of the demo training records plus the prompt template's words."""
    texts = [
        "### Instruction:\n",
        "### Input:\n",
        "### Response:\n",
        "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18",
    ]
    for line in (data_dir / "train.jsonl").read_text().splitlines():
        record = json.loads(line)
        texts += [record["instruction"], record["input"], record["output"]]
    return texts


def ensure_demo_model(path: Path = DEMO_MODEL, data_dir: Path = DEMO_DATA) -> Path:
    """Build (once) and return the demo base model folder."""
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    tokenizer = build_tokenizer(demo_corpus(data_dir), vocab_size=640)
    tokenizer.chat_template = None  # the demo uses the documented alpaca template
    build_tiny_model_dir(path, "llama", tokenizer, seed=1234, **DEMO_SIZES)
    return path

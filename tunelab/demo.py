"""The offline demo: fine-tune a small model on the bundled instruction data and show it learned.

The base model ships with the repository in `models/demo-base/` (under 4 MB);
`scripts/make_demo_model.py` rebuilds it from nothing, deterministically on a given machine (about
5 minutes on 2 cores):

1. a Llama-architecture model (hidden 128, 4 layers, about 0.9M parameters) with random weights
   and a byte-level BPE tokenizer trained on the demo data;
2. "pre-trained" with tunelab itself (full fine-tuning, `plain` template) on plain statements of
   the same six operations in another wording (`reverse: red owl =` -> ` owl red`), so that it
   knows the words and the operations but not the instruction format.

Instruction fine-tuning then teaches it to follow `### Instruction / ### Input / ### Response`
prompts: the demo evaluates the base model (eval loss, exact-match accuracy of greedy answers on
the held-out split), trains with the given config, evaluates again and prints a before/after table.
Nothing is downloaded. The demo's config, data and model are found in the repository from any
working directory (`bundled`); what it writes goes to the config's `output_dir` (`runs/demo`),
relative to the working directory.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from tunelab.console import note
from tunelab.demo_data import TASKS, WORDS
from tunelab.errors import TunelabError
from tunelab.tiny import build_tiny_model_dir, build_tokenizer

REPOSITORY = Path(__file__).resolve().parent.parent
"""The checkout tunelab runs from (an editable install): the demo's model, data and configs are there."""
DEMO_DATA = REPOSITORY / "data" / "demo"
DEMO_MODEL = REPOSITORY / "models" / "demo-base"
DEMO_SIZES = {
    "hidden": 128,
    "layers": 4,
    "heads": 4,
    "kv_heads": 2,
    "intermediate": 384,
    "max_positions": 256,
}
PRETRAIN_STEPS = 5000


def bundled(path: str | Path) -> Path:
    """`path` itself where it exists (or is absolute); else, for a relative path, the repository's
    file of that name, so that the demo's configs, which name `configs/`, `data/demo/` and
    `models/demo-base` relative to the repository, work from any working directory."""
    path = Path(path).expanduser()
    if path.is_absolute() or path.exists() or not (REPOSITORY / path).exists():
        return path
    return REPOSITORY / path


def locate_bundled_inputs(config) -> None:
    """Point a demo run config's model and data at the repository's files (`bundled`). Its
    `output_dir` stays as written: relative to the working directory."""
    config.model.name_or_path = str(bundled(config.model.name_or_path))
    config.data.train = str(bundled(config.data.train))
    if config.data.eval:
        config.data.eval = str(bundled(config.data.eval))


def demo_corpus(data_dir: Path = DEMO_DATA) -> list[str]:
    """Every text field of the demo training records plus the prompt template's words."""
    texts = ["### Instruction:\n", "### Input:\n", "### Response:\n", " ".join(str(i) for i in range(20))]
    texts += [f"{name}: = plus" for name in TASKS]
    for line in (data_dir / "train.jsonl").read_text().splitlines():
        record = json.loads(line)
        texts += [record["instruction"], record["input"], record["output"]]
    return texts


def pretraining_records(n: int, seed: int = 99) -> list[dict]:
    """Plain statements of the demo operations, worded unlike the instructions, as
    prompt/completion pairs: `{"prompt": "reverse: red owl =", "completion": " owl red"}`."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        name = rng.choice([*TASKS, "add"])
        if name == "add":
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            records.append({"prompt": f"{a} plus {b} =", "completion": f" {a + b}"})
            continue
        words = rng.sample(WORDS, rng.randint(2, 3) if name == "repeat" else rng.randint(2, 5))
        records.append({"prompt": f"{name}: {' '.join(words)} =", "completion": f" {TASKS[name][1](words)}"})
    return records


def ensure_demo_model(
    path: Path = DEMO_MODEL, data_dir: Path = DEMO_DATA, pretrain_steps: int = PRETRAIN_STEPS
) -> Path:
    """Return the demo base model folder, building it first if it is missing (see the module docstring)."""
    path = Path(path)
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    import tunelab

    if not (Path(data_dir) / "train.jsonl").is_file():
        raise TunelabError(
            f"cannot build the demo base model: {Path(data_dir) / 'train.jsonl'} is missing "
            "(the demo runs from a tunelab checkout, installed with pip install -e .)"
        )
    work = path.parent / f"{path.name}.build"
    shutil.rmtree(work, ignore_errors=True)
    tokenizer = build_tokenizer(demo_corpus(data_dir), vocab_size=640)
    tokenizer.chat_template = None  # the demo uses the documented alpaca template
    init = build_tiny_model_dir(work / "init", "llama", tokenizer, seed=1234, **DEMO_SIZES)
    if pretrain_steps == 0:
        shutil.copytree(init, work / "final")
    else:
        corpus = work / "pretrain.jsonl"
        corpus.write_text("".join(json.dumps(r) + "\n" for r in pretraining_records(20000)))
        note(f"[demo] pre-training the demo base model ({pretrain_steps} steps, into {path}) ...")
        config = tunelab.load_config(
            None,
            model={"name_or_path": str(init)},
            data={"train": str(corpus), "format": "prompt_completion", "template": "plain", "max_length": 48},
            train={
                "max_steps": pretrain_steps,
                "batch_size": 32,
                "lr": 2e-3,
                "warmup_steps": 30,
                "weight_decay": 0.01,
                "seed": 1234,
                "log_every": 20,
            },
            output_dir=str(work / "run"),
        )
        tunelab.train(config)
        shutil.copytree(work / "run" / "final", work / "final")
    if path.exists():
        shutil.rmtree(path)
    (work / "final").rename(path)
    shutil.rmtree(work, ignore_errors=True)
    return path

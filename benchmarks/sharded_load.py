"""Per-rank peak memory of FSDP's sharded loading on 1, 2 and 4 gloo ranks (issue 16).

    .venv/bin/python -m benchmarks.sharded_load [--dir /tmp/sharded-bench] [--layers 2] [--ranks 1 2 4]

Builds (once) a Llama-architecture model whose weights dominate a process's memory (width 1024,
vocabulary 32000, untied, `--layers` decoder layers: 333 MB of float32 safetensors with 2), then
for each rank count launches torchrun on 127.0.0.1 running the check the tests run
(tests/distributed/sharded_checks.py `peak_memory`, through tests/distributed/worker.py): each rank
notes its peak resident memory (VmHWM) once everything is imported and the tokenizer and config
are read (the baseline), then sets the run up (`setup_run` + `wrap`: under FSDP the model is
sharded and each rank reads its rows) and reads every weight once (a memory-mapped one counts only
when touched), and notes the peak again. One rank is the single process: a whole load.

Prints, per rank count, the largest peak above the baseline over the ranks and its ratio to the
single process's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tests.distributed.launch import launch, write_config


def build(model_dir: Path, layers: int) -> None:
    """The wide model and the tests' tokenizer in `model_dir` (skipped when already there)."""
    from transformers import AutoModelForCausalLM

    from tunelab.tiny import build_tokenizer, default_corpus, tiny_config

    if (model_dir / "config.json").exists():
        return
    config = tiny_config("llama", vocab_size=32000, hidden=1024, layers=layers, heads=16, kv_heads=4)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(model_dir)
    build_tokenizer(default_corpus()).save_pretrained(model_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/sharded-bench"))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    from tunelab.config import load_config

    root = args.dir
    model_dir = root / f"wide-{args.layers}"
    root.mkdir(parents=True, exist_ok=True)
    build(model_dir, args.layers)
    size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 2**20
    config = load_config(
        None,
        ["train.strategy=fsdp", "train.progress=false"],
        model={"name_or_path": str(model_dir)},
        data={"train": "unused.jsonl"},
        output_dir=str(root / "run"),
    )
    config_path = write_config(config, root / "memory.yaml")
    above = {}
    for ranks in args.ranks:
        launch(
            [{"call": "tests.distributed.sharded_checks:peak_memory", "args": [str(root), config_path]}],
            root,
            ranks,
        )
        peaks = json.loads((root / f"peak-{ranks}.json").read_text())
        above[ranks] = (
            max((peak - base) / 1024 for base, peak in peaks),
            sum(b for b, _ in peaks) / len(peaks) / 1024,
        )
    one = above.get(1, (None,))[0]
    print(f"model: {size:.0f} MiB of float32 safetensors ({model_dir})")
    print(
        "| ranks | baseline per rank (MiB) | peak above baseline, largest rank (MiB) | ratio to 1 process |"
    )
    print("|---|---|---|---|")
    for ranks, (peak, base) in above.items():
        ratio = f"{peak / one:.2f}" if one else "-"
        print(f"| {ranks} | {base:.0f} | {peak:.0f} | {ratio} |")


if __name__ == "__main__":
    main()

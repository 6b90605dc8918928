"""Every method on the demo task, one after the other: accuracy, loss, speed, memory.

    .venv/bin/python benchmarks/demo_methods.py [--configs demo demo-lora ...] [--steps N]

Runs `tunelab demo --config configs/<name>.yaml` for each config in its own process (so peak RSS
is per method) and prints a Markdown table: trainable parameters, held-out exact match and eval
loss before and after, real tokens/s and peak RSS. With `--prefix-lengths 8 32 128`, also trains
prefix tuning for a few steps at each prefix length m on a larger model and reports memory growth.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["demo", "demo-partial", "demo-lora", "demo-adapter", "demo-prefix"]

CHILD = """
import json, resource, sys
import tunelab.cli
code = tunelab.cli.main(sys.argv[1:])
print("@@" + json.dumps({"code": code, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

PREFIX_CHILD = """
import json, resource, sys, time
import tunelab
m, steps, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
method = {"name": "prefix", "num_virtual_tokens": m} if m else {"name": "lora", "r": 1, "target_modules": ["q_proj"]}
config = tunelab.load_config(None, model={"name_or_path": out + "/model"}, method=method,
    data={"train": "data/demo/train.jsonl", "format": "instruction", "template": "alpaca", "max_length": 64},
    train={"max_steps": steps, "batch_size": 32, "lr": 1e-3, "progress": False}, output_dir=out + f"/run-{m}")
start = time.perf_counter()
tunelab.train(config)
rows = [json.loads(l) for l in open(out + f"/run-{m}/metrics.jsonl")]
print("@@" + json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "tokens_per_s": rows[-1]["tokens_per_s"]}))
"""


def run_child(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("@@")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{args} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][2:])


def methods_table(configs: list[str], overrides: list[str]) -> None:
    print(
        "| config | method | trainable params | exact match before -> after | eval loss before -> after | real tokens/s | peak RSS |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in configs:
        out_dir = f"runs/bench-{name}"
        stats = run_child(
            CHILD,
            "demo",
            "--config",
            f"configs/{name}.yaml",
            f"output_dir={out_dir}",
            "train.progress=false",
            *overrides,
        )
        demo = json.loads((ROOT / out_dir / "demo.json").read_text())
        rows = [json.loads(line) for line in (ROOT / out_dir / "metrics.jsonl").read_text().splitlines()]
        config = (ROOT / out_dir / "config.yaml").read_text()
        method = config.split("method:")[1].split("name:")[1].split()[0]
        trainable = demo["after"].get("trainable_params", "")
        before, after = demo["before"], demo["after"]
        print(
            f"| {name} | {method} | {trainable} | {100 * before['exact_match']:.1f}% -> {100 * after['exact_match']:.1f}% "
            f"| {before['eval_loss']:.3f} -> {after['eval_loss']:.3f} | {rows[-1]['tokens_per_s']:.0f} "
            f"| {stats['peak_rss_mb']:.0f} MB |",
            flush=True,
        )


def prefix_memory(lengths: list[int], steps: int) -> None:
    from transformers import AutoTokenizer

    from tunelab.demo import DEMO_MODEL, ensure_demo_model
    from tunelab.tiny import build_tiny_model_dir

    out = ROOT / "runs" / "bench-prefix-memory"
    ensure_demo_model()
    tokenizer = AutoTokenizer.from_pretrained(ROOT / DEMO_MODEL)
    build_tiny_model_dir(
        out / "model",
        "llama",
        tokenizer,
        seed=0,
        hidden=512,
        layers=8,
        heads=8,
        kv_heads=4,
        intermediate=1536,
    )
    print("| prefix length m | peak RSS | real tokens/s |")
    print("|---|---|---|")
    for m in lengths:
        stats = run_child(PREFIX_CHILD, str(m), str(steps), str(out))
        label = m if m else "0 (LoRA r=1 on q_proj, baseline)"
        print(f"| {label} | {stats['peak_rss_mb']:.0f} MB | {stats['tokens_per_s']:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", nargs="*", default=CONFIGS)
    parser.add_argument("--prefix-lengths", nargs="*", type=int, default=[])
    parser.add_argument("--prefix-steps", type=int, default=10)
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every demo run")
    args = parser.parse_args()
    if args.configs:
        methods_table(args.configs, args.overrides)
    if args.prefix_lengths:
        prefix_memory(args.prefix_lengths, args.prefix_steps)


if __name__ == "__main__":
    main()

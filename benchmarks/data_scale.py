"""Data at scale (issue 19): tokenising 1,000,000 records once, and what a cached run costs.

    .venv/bin/python -m benchmarks.data_scale                     # 1M and 10k records, a few minutes
    .venv/bin/python -m benchmarks.data_scale --records 200000 --small 10000 --out /tmp/data-scale

Generates Alpaca-like instruction records (an instruction, an input for one in three, an output;
about 40 words each) into JSONL files, and a tiny Llama with the locally trained tokenizer of the
tests (`tunelab.tiny`). Each measurement runs in a fresh child process (`--child`), which reports
its own peak resident memory (`ru_maxrss`):

1. cold: `prepare_data` with an empty token cache: read, check and tokenise every record (all
   cores, `--workers`), write the cache. Reports records/s of the whole preparation and of the
   tokenising alone.
2. warm: `tunelab.train` of the tiny model for `--steps` SFT steps with the cache filled: the time
   from the child's start to the end of the first step (the first metrics row), and the peak RSS.
3. the same warm run over `--small` records: the RSS goal is (1) within +200 MB of (2).

Prints one `RESULT {json}` line and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

WORDS = (
    "the quick brown fox jumps over a lazy dog while instruction response input context answer "
    "question reverse sort count add sum upper lower letters words numbers what is please write "
    "say hello world yes no good bad best worst"
).split()


def generate(path: Path, count: int, seed: int = 0) -> None:
    """`count` Alpaca-like records as JSONL at `path`."""
    rng = random.Random(seed)
    with open(path, "w") as out:
        for i in range(count):
            record = {
                "instruction": " ".join(rng.choices(WORDS, k=rng.randint(6, 16))) + f" {i}?",
                "input": " ".join(rng.choices(WORDS, k=rng.randint(4, 12))) if i % 3 == 0 else "",
                "output": " ".join(rng.choices(WORDS, k=rng.randint(8, 24))) + ".",
            }
            out.write(json.dumps(record) + "\n")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its finished children (the tokenising
    workers): a figure that other work on the machine does not change, unlike the wall time."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def child(args: argparse.Namespace) -> dict:
    """One measurement in this process (see the module docstring)."""
    start = time.perf_counter()
    from tunelab.config import load_config

    config = load_config(
        None,
        [],
        model={"name_or_path": str(args.model)},
        method={"name": "lora", "r": 4},
        data={"train": str(args.data), "template": "alpaca", "max_length": 128, "cache_dir": str(args.cache)},
        train={"max_steps": args.steps, "batch_size": 8, "progress": False, "seed": 0},
        eval={"generate": False},
        output_dir=str(args.run),
    )
    if args.child == "cold":
        from tunelab.data import tokenize
        from tunelab.data.dataset import prepare_data
        from tunelab.models import load_tokenizer

        tokenizer = load_tokenizer(str(args.model), False)
        spent = {"tokenising": 0.0}
        begin = time.perf_counter()
        chunks = tokenize.encode_in_parallel

        def counting(*a, **k):  # the tokenising phase: from the first chunk asked to the last written
            first = time.perf_counter()
            yield from chunks(*a, **k)
            spent["tokenising"] += time.perf_counter() - first

        from tunelab.data import dataset

        dataset.encode_in_parallel = counting
        data = prepare_data(config.data, tokenizer, seed=0, workers=args.workers)
        total = time.perf_counter() - begin
        records = len(data.train.conversations)
        return {
            "records": records,
            "examples": len(data.train.examples),
            "prepare_s": total,
            "tokenise_s": spent["tokenising"],
            "records_per_s": records / total,
            "tokenise_records_per_s": records / spent["tokenising"],
            "tokenized": data.tokenized,
            "peak_rss_mb": peak_rss_mb(),
            "cpu_s": cpu_seconds(),
        }
    import tunelab
    from tunelab.training import loop

    first_step = {}
    original = loop.MetricsLog.log

    def log(self, row):
        original(self, row)
        first_step.setdefault("s", time.perf_counter() - start)

    loop.MetricsLog.log = log
    tunelab.train(config)
    return {
        "first_step_s": first_step["s"],
        "total_s": time.perf_counter() - start,
        "peak_rss_mb": peak_rss_mb(),
    }


def cpu_cell(cold: dict) -> str:
    if "cpu_s" not in cold:
        return "-"
    return f"{cold['cpu_s']:.0f} ({cold['records'] / cold['cpu_s']:,.0f})"


def run_child(phase: str, args: argparse.Namespace, data: Path, run: Path) -> dict:
    command = [sys.executable, "-m", "benchmarks.data_scale", "--child", phase, "--model", str(args.model)]
    command += ["--data", str(data), "--cache", str(args.out / "cache"), "--run", str(run)]
    command += ["--steps", str(args.steps), "--workers", str(args.workers)]
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/tunelab-data-scale"))
    parser.add_argument("--child", choices=["cold", "warm"])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--cache", type=Path)
    parser.add_argument("--run", type=Path)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return

    import shutil

    from tunelab.tiny import build_tiny_model_dir, build_tokenizer, default_corpus

    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    args.model = build_tiny_model_dir(args.out / "model", "llama", build_tokenizer(default_corpus()), seed=0)
    results = {}
    for name, count in (("large", args.records), ("small", args.small)):
        data = args.out / f"{name}.jsonl"
        generate(data, count)
        cold = run_child("cold", args, data, args.out / f"run-{name}-cold")
        warm = run_child("warm", args, data, args.out / f"run-{name}-warm")
        results[name] = {"records": count, "file_mb": data.stat().st_size / 2**20, "cold": cold, "warm": warm}
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    large, small = results["large"], results["small"]
    results["warm_rss_growth_mb"] = large["warm"]["peak_rss_mb"] - small["warm"]["peak_rss_mb"]
    print("RESULT " + json.dumps(results), flush=True)
    rows = [
        ("records (JSONL MB)", lambda r: f"{r['records']:,} ({r['file_mb']:.0f} MB)"),
        (
            "cold: prepare_data s (records/s)",
            lambda r: f"{r['cold']['prepare_s']:.1f} ({r['cold']['records_per_s']:,.0f})",
        ),
        (
            "cold: tokenising s (records/s)",
            lambda r: f"{r['cold']['tokenise_s']:.1f} ({r['cold']['tokenise_records_per_s']:,.0f})",
        ),
        ("cold: CPU s, all processes (records per CPU s)", lambda r: cpu_cell(r["cold"])),
        ("cold: peak RSS MB", lambda r: f"{r['cold']['peak_rss_mb']:.0f}"),
        ("cached run: start to first step s", lambda r: f"{r['warm']['first_step_s']:.1f}"),
        ("cached run: peak RSS MB", lambda r: f"{r['warm']['peak_rss_mb']:.0f}"),
    ]
    print(f"\n| | {args.records:,} records | {args.small:,} records |\n|---|---|---|")
    for label, cell in rows:
        print(f"| {label} | {cell(large)} | {cell(small)} |")
    print(f"\ncached run RSS, large - small: {results['warm_rss_growth_mb']:+.0f} MB (goal: within +200 MB)")


if __name__ == "__main__":
    main()

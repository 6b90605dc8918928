"""Soak run: does a long run's memory stay flat? (issue 21)

    .venv/bin/python -m benchmarks.soak                      # 2,000 steps, about 25 minutes on 2 cores
    .venv/bin/python -m benchmarks.soak --steps 300 --out /tmp/soak

Trains the LoRA workload of `benchmarks/` (31.6M parameters, batch 8, LoRA r=16 on every linear
layer) with packing and the bf16 fast settings through the CLI, `tunelab train`, in a child
process, and reads the child's resident memory (VmRSS in /proc) and its step (the rows of
`metrics.jsonl`) once a second from outside, so nothing in the run is changed by the measuring.
Checkpoints are written every `--save-every` steps, evaluation runs every `--eval-every` steps, as
in a real run. Writes `soak.json` (every sample) and `soak.png` (RSS against step) into `--out`,
and prints the median RSS over a window after warm-up (`--warmup`, when the allocator and oneDNN's
bounded primitive cache have filled) and over the last window, the growth between them (also of
each window's largest RSS), and the largest RSS seen. Goal: growth under 5%.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml


def rss_mb(pid: int) -> float | None:
    """The resident memory of process `pid` in MB, or None once it has gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def steps_logged(metrics: Path) -> int:
    try:
        return len(metrics.read_text().splitlines())
    except OSError:
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default="benchmarks/.cache")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument(
        "--warmup", type=int, default=300, help="steps of warm-up (caches filling) before the baseline window"
    )
    parser.add_argument("--window", type=int, default=200, help="steps in the baseline and final windows")
    parser.add_argument("--report-only", action="store_true", help="redo the report from OUT/soak.json")
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--out", default="benchmarks/.cache/soak")
    args = parser.parse_args()

    out = Path(args.out)
    if args.report_only:
        report([tuple(s) for s in json.loads((out / "soak.json").read_text())["samples"]], args, out)
        return
    from benchmarks.workload import build

    workload = build(args.cache)
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / "run"
    config = {
        "model": {"name_or_path": str(workload.model_dir), "dtype": "bfloat16"},
        "method": {"name": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"},
        "data": {
            "train": str(workload.train_alpaca),
            "eval": str(workload.eval_alpaca),
            "template": "alpaca",
            "max_length": 512,
            "packing": True,
        },
        "train": {
            "max_steps": args.steps,
            "batch_size": 8,
            "lr": 2e-4,
            "schedule": "constant",
            "precision": "bf16",
            "log_every": 1,
            "save_every": args.save_every,
            "eval_every": args.eval_every,
            "eval_batches": 4,
            "progress": False,
        },
        "eval": {"generate": False},
        "output_dir": str(run_dir),
    }
    config_path = out / "soak.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-m", "tunelab", "train", str(config_path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    samples = []  # (seconds, step, rss MB)
    while child.poll() is None:
        rss = rss_mb(child.pid)
        if rss is not None:
            samples.append((time.perf_counter() - started, steps_logged(run_dir / "metrics.jsonl"), rss))
        time.sleep(1.0)
    if child.returncode != 0:
        raise SystemExit(f"the soak run failed ({child.returncode}): {child.stderr.read()[-2000:]}")
    report(samples, args, out)


def report(samples: list[tuple[float, int, float]], args, out: Path) -> None:
    """Write soak.json and soak.png; print the growth after warm-up: the median RSS over the last
    `window` steps against the median over the `window` steps after `warmup`, and the same for
    the largest RSS of each window."""
    import statistics

    last_step = samples[-1][1]
    first = [rss for _, step, rss in samples if args.warmup <= step < args.warmup + args.window]
    last = [rss for _, step, rss in samples if step > last_step - args.window]
    growth = 100 * (statistics.median(last) - statistics.median(first)) / statistics.median(first)
    peak_growth = 100 * (max(last) - max(first)) / max(first)
    summary = {
        "steps": last_step,
        "baseline_window": [args.warmup, args.warmup + args.window],
        "rss_median_baseline_mb": round(statistics.median(first), 1),
        "rss_median_last_window_mb": round(statistics.median(last), 1),
        "growth_percent": round(growth, 2),
        "peak_growth_percent": round(peak_growth, 2),
        "max_rss_mb": round(max(rss for _, _, rss in samples), 1),
        "seconds": round(samples[-1][0], 1),
    }
    (out / "soak.json").write_text(json.dumps({"summary": summary, "samples": samples}))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4))
    axis.plot([s for _, s, _ in samples], [r for _, _, r in samples])
    axis.axvspan(args.warmup, args.warmup + args.window, color="grey", alpha=0.2, label="baseline window")
    axis.axvspan(last_step - args.window, last_step, color="orange", alpha=0.2, label="last window")
    axis.set_xlabel("step")
    axis.set_ylabel("resident memory (MB)")
    axis.set_title(f"soak: LoRA, packing, bf16; median RSS growth after warm-up {growth:+.1f}%")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "soak.png", dpi=100)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

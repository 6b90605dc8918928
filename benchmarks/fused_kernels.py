"""`train.fused_kernels` on and off, paired in one process: a training step's forward and backward.

    python -m benchmarks.fused_kernels [--rounds 8] [--steps 3] [--method lora|full]
    python -m benchmarks.fused_kernels --model smollm --only loss --rounds 4
    python -m benchmarks.fused_kernels --method full train.precision=fp32 model.dtype=float32

The model, data and step are tunelab's own, from the whole-job benchmark's minimal config
(`benchmarks.defaults`: the 31.6M workload or SmolLM2-135M-Instruct, LoRA r=16, packed rows of 8
real records, and this machine's defaults: a bf16 base under bf16 autocast where the CPU computes
bf16, float32 elsewhere): `prepare_model`, `prepare_data`, `pack_batch` and the chunked loss.
Trailing `key=value` overrides change the config (a float32 run on a CPU that has bf16, or the
other way). Each step runs in the run's own context (`Run.autocast`: with the kernels, what they
output is rebuilt in backward, not kept). Each round runs `--steps` steps with the kernels, then
`--steps` without (`remove_fused_kernels`), in alternating order; one warm-up step before each
timing. `--only loss` keeps the norm and MLP kernels on in both and switches only the LM head's
cross-entropy rows. One process and alternation keep the comparison fair on a noisy machine: a
slower minute slows both. Prints the per-round ratio (unfused / fused time), the median, and the
largest resident set seen with each (the process's RSS after its steps).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from types import SimpleNamespace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting and round")
    parser.add_argument("--method", default="lora", choices=["lora", "full"])
    parser.add_argument("--model", default="workload", choices=["workload", "smollm"])
    parser.add_argument("--only", default="all", choices=["all", "loss"], help="which kernels to switch")
    parser.add_argument("--cache", default="benchmarks/.cache")
    parser.add_argument("overrides", nargs="*", help="tunelab config overrides, key.sub=value")
    args = parser.parse_args()

    import torch

    import tunelab
    from benchmarks.common import status_kb
    from benchmarks.defaults import CASES, commands, prepare
    from tunelab.allocator import return_freed_memory
    from tunelab.data.dataset import prepare_data
    from tunelab.data.packing import pack_batch
    from tunelab.kernels import cpu_fused
    from tunelab.kernels.packed_attention import use_packed_attention
    from tunelab.logprobs import model_lm_loss_sum
    from tunelab.training.setup import Run, prepare_model

    return_freed_memory()
    case = next(c for c in CASES[args.model] if c.method == args.method)
    data = prepare(args.cache, args.model, 600, 64)
    out = commands(case, data, Path(args.cache) / "fused-kernels", None, [])
    overrides = ["train.progress=false", "train.fused_kernels=true", *args.overrides]
    config = tunelab.load_config(out["tunelab"][2], overrides)
    model, tokenizer, _, _ = prepare_model(config)
    use_packed_attention(model, native=config.data.native_attention)
    examples = prepare_data(config.data, tokenizer, seed=0).train.examples
    batches = [pack_batch(examples[i : i + 8]) for i in range(0, 8 * args.steps, 8)]
    tokens = sum(b["input_ids"].numel() for b in batches)

    def context(fused: bool):
        """The run's forward-pass context with the kernels on or off (`Run.autocast`)."""
        config.train.fused_kernels = fused
        return Run.autocast(SimpleNamespace(config=config, device=torch.device("cpu")))

    def steps(fused: bool) -> float:
        started = time.perf_counter()
        for batch in batches:
            with context(fused):
                loss = model_lm_loss_sum(model, batch)
            loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    seconds = {"fused": [], "unfused": []}
    peak = {"fused": 0.0, "unfused": 0.0}
    for round_ in range(args.rounds):
        order = ["fused", "unfused"] if round_ % 2 == 0 else ["unfused", "fused"]
        for setting in order:
            cpu_fused.remove_fused_kernels(model)
            if setting == "fused" or args.only == "loss":
                cpu_fused.apply_fused_kernels(model)
            if setting == "unfused" and args.only == "loss":
                del model.get_output_embeddings().__dict__[cpu_fused.FUSED_LOSS]
            fused = setting == "fused" or args.only == "loss"
            steps(fused)  # warm-up
            seconds[setting].append(steps(fused))
            peak[setting] = max(peak[setting], status_kb("VmRSS") / 1024)
    ratios = [u / f for u, f in zip(seconds["unfused"], seconds["fused"], strict=True)]
    print(
        f"{args.model}, method {args.method}, precision {config.train.precision}, kernels switched: "
        f"{args.only}, {args.steps} packed rows per timing ({tokens} tokens), {args.rounds} rounds"
    )
    for setting in seconds:
        each = " ".join(f"{tokens / s:.0f}" for s in seconds[setting])
        print(f"{setting:8s} tokens/s: {each}  (RSS up to {peak[setting]:.0f} MB)")
    print(
        f"speed-up (unfused s / fused s): median x{statistics.median(ratios):.3f}, rounds: "
        + " ".join(f"x{r:.2f}" for r in ratios)
    )


if __name__ == "__main__":
    main()

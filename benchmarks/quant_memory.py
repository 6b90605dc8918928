"""Peak memory while loading a base in full precision and quantised (QLoRA), and DoRA's step cost.

    .venv/bin/python -m benchmarks.quant_memory load [--dir /tmp/quant-bench]   # peak RSS per load
    .venv/bin/python -m benchmarks.quant_memory dora [--size tiny|small] [--bits 4]  # DoRA / LoRA step time

`load` builds (once) a random 0.75B-parameter Llama-architecture model saved in bfloat16 (1.5 GB
of safetensors), then loads it in a fresh process per setting through `tunelab.models.load_model`:
bfloat16 unquantised, 8-bit, 4-bit NF4 (+ double quantisation). A thread samples the process's
anonymous resident memory (RssAnon, the tensors; file pages of the memory-mapped safetensors are
reported apart as RssFile: page cache, shared and reclaimable) every 5 ms; VmHWM is the kernel's
peak of both. If the loader held the full-precision base whole on the way in, the quantised loads'
anonymous peak would reach the bfloat16 size. One forward pass after the load reads every weight
(the unquantised base is mapped, its pages come in as they are used).

`dora` times forward + backward + AdamW steps of LoRA and of DoRA (r=16, all-linear) on the test
suite's tiny Llama (or a small one), on a full-precision or quantised base, on CPU, alternating
the two, median of the steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch


def build(model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    if (model_dir / "config.json").exists():
        return
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=12,
        num_attention_heads=16,
        num_key_value_heads=16,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(model_dir, safe_serialization=True)


def _status() -> dict[str, int]:
    """RssAnon, RssFile and VmHWM of this process, in kB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def load_once(model_dir: str, bits: int | None) -> dict:
    """Load the model once (in this process) and report the peaks, in MB."""
    from tunelab.config import QuantizationConfig
    from tunelab.models import load_model

    quantization = (
        QuantizationConfig(bits=bits, double_quant=True, compute_dtype="bfloat16") if bits else None
    )
    peaks = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            status = _status()
            for key in peaks:
                peaks[key] = max(peaks[key], status[key])
            time.sleep(0.005)

    before = _status()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    model = load_model(model_dir, dtype="bfloat16", device="cpu", quantization=quantization)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    after = _status()
    with torch.no_grad():  # one forward: every weight page is read (a mapped file's come in now)
        model(input_ids=torch.arange(16).unsqueeze(0))
    used = _status()
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    mb = 1024
    return {
        "bits": bits,
        "seconds": round(seconds, 1),
        "model_tensors_MB": round(weights / 2**20),
        "anon_before_MB": before["RssAnon"] // mb,
        "anon_peak_MB": peaks["RssAnon"] // mb,
        "anon_after_MB": after["RssAnon"] // mb,
        "file_peak_MB": peaks["RssFile"] // mb,
        "VmHWM_MB": after["VmHWM"] // mb,
        "after_forward_anon_MB": used["RssAnon"] // mb,
        "after_forward_file_MB": used["RssFile"] // mb,
    }


SIZES = {
    # name: (hidden, intermediate, layers, heads, vocab, batch, sequence, steps)
    "tiny": (64, 128, 2, 4, 512, 8, 64, 100),  # the test suite's tiny Llama (tunelab.tiny)
    "small": (512, 1376, 4, 8, 2048, 4, 256, 12),
}


def dora_cost(size: str = "tiny", bits: int | None = None) -> dict:
    """Median step time (forward, backward, AdamW) of LoRA and DoRA (r=16, all-linear) on the same
    Llama, alternating the two; `bits` quantises the base first (through a saved folder)."""
    import tempfile

    from transformers import AutoModelForCausalLM

    from tunelab.config import QuantizationConfig
    from tunelab.methods import lora, trainable_parameters
    from tunelab.models import load_model
    from tunelab.tiny import tiny_config

    hidden, intermediate, layers, heads, vocab, batch, sequence, steps = SIZES[size]
    torch.set_num_threads(1)  # the machine is shared: one thread each, alternating, is the least noisy
    config = tiny_config("llama", vocab, hidden, layers, heads, heads, intermediate)
    ids = torch.randint(3, vocab, (batch, sequence), generator=torch.Generator().manual_seed(0))
    folder = tempfile.mkdtemp()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    quantization = QuantizationConfig(bits=bits) if bits else None
    models, optimizers = {}, {}
    for use_dora in (False, True):
        model = load_model(folder, device="cpu", quantization=quantization)
        lora.apply(model, lora.Options(r=16, alpha=32, target_modules="all-linear", use_dora=use_dora))
        models[use_dora] = model.train()
        optimizers[use_dora] = torch.optim.AdamW(trainable_parameters(model).values(), lr=1e-4)
    times: dict[bool, list[float]] = {False: [], True: []}
    for step in range(steps + 3):
        for use_dora in (False, True):
            start = time.perf_counter()
            models[use_dora](input_ids=ids, labels=ids).loss.backward()
            optimizers[use_dora].step()
            optimizers[use_dora].zero_grad()
            if step >= 3:  # warm-up
                times[use_dora].append(time.perf_counter() - start)
    lora_s, dora_s = statistics.median(times[False]), statistics.median(times[True])
    pair_ratio = statistics.median(d / lo for lo, d in zip(times[False], times[True], strict=True))
    return {
        "size": size,
        "bits": bits,
        "lora_step_ms": round(1000 * lora_s, 1),
        "dora_step_ms": round(1000 * dora_s, 1),
        "dora_over_lora": round(dora_s / lora_s, 3),
        "median_step_pair_ratio": round(pair_ratio, 3),  # each DoRA step against the LoRA step before it
        "threads": torch.get_num_threads(),
        "tokens_per_step": ids.numel(),
        "steps": steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["load", "dora", "load-once"])
    parser.add_argument("--dir", default="/tmp/quant-bench")
    parser.add_argument("--bits", type=int, default=0)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    args = parser.parse_args()
    if args.what == "dora":
        print(json.dumps(dora_cost(args.size, args.bits or None)))
        return
    model_dir = Path(args.dir) / "llama-0.75b-bf16"
    if args.what == "load-once":
        print(json.dumps(load_once(str(model_dir), args.bits or None)))
        return
    build(model_dir)
    for bits in (0, 8, 4):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.quant_memory",
                "load-once",
                "--dir",
                args.dir,
                "--bits",
                str(bits),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()

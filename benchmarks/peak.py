"""Measured matmul peak of this machine, the denominator of model FLOPs utilisation (MFU).

    python -m benchmarks.peak            # GFLOP/s for float32 and bfloat16, torch's default threads

The best of several square and model-shaped matrix products (`a @ b`, 2 m n k FLOPs each).
"""

from __future__ import annotations

import json
import time

import torch

SHAPES = [(2048, 2048, 2048), (4096, 4096, 4096), (1536, 512, 1376), (1536, 1376, 512)]
GPU_SHAPES = [(4096, 4096, 4096), (8192, 8192, 8192), (4096, 896, 4864), (4096, 4864, 896)]


def matmul_gflops(dtype: torch.dtype, device: str = "cpu", seconds: float = 1.0) -> float:
    """Best GFLOP/s over `SHAPES` for `dtype` on `device`."""
    best = 0.0
    shapes = SHAPES if device == "cpu" else GPU_SHAPES
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device).to(dtype)
        b = torch.randn(k, n, device=device).to(dtype)
        for _ in range(2):
            a @ b
        reps, elapsed = 0, 0.0
        while elapsed < seconds / len(shapes):
            if device != "cpu":
                torch.cuda.synchronize()
            start = time.perf_counter()
            a @ b
            if device != "cpu":
                torch.cuda.synchronize()
            elapsed += time.perf_counter() - start
            reps += 1
            best = max(best, 2 * m * n * k / (time.perf_counter() - start) / 1e9)
    return best


def measure(device: str = "cpu") -> dict:
    """{"fp32": GFLOP/s, "bf16": GFLOP/s, "threads": n}."""
    return {
        "fp32": matmul_gflops(torch.float32, device),
        "bf16": matmul_gflops(torch.bfloat16, device),
        "threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print("RESULT " + json.dumps(measure(args.device)), flush=True)

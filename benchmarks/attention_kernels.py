"""Packed attention on the CPU: tunelab's C++ kernel against PyTorch's SDPA per example, paired.

    python -m benchmarks.attention_kernels [--rounds 5] [--dtype float32|bfloat16]

One layer's attention of the 31.6M workload's shape (8 query heads, 4 key/value heads, head dim 64)
over one packed row of 8 examples (146, 210, 95, 303, 160, 120, 180, 250 tokens: 1,464, about the
workload's batch of 8), forward and then backward, through the two functions `data.native_attention`
chooses between (`tunelab.kernels.cpu_attention.packed_native`, `packed_kernels.per_example_sdpa`).
Each round times 5 calls of each, in alternating order, after two warm-up calls. Prints the CPU's
vector instruction set, each round's times, the median ratio (SDPA time / kernel time: above 1, the
kernel is faster) and the largest difference between the two outputs.
"""

from __future__ import annotations

import argparse
import statistics
import time

LENGTHS = (146, 210, 95, 303, 160, 120, 180, 250)
HEADS, KV_HEADS, HEAD_DIM = 8, 4, 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=5, help="timed calls per function and round")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    import torch

    from tunelab.kernels import cpu_attention
    from tunelab.kernels.packed_kernels import per_example_sdpa

    assert cpu_attention.build(), "the C++ kernel did not build here"
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(0)
    tokens = sum(LENGTHS)
    cu = torch.tensor([0, *LENGTHS]).cumsum(0).to(torch.int32)  # (B + 1,), as pack_batch makes it

    def leaf(heads: int) -> torch.Tensor:  # (1, heads, N, D), as transformers hands it over
        return torch.randn(1, heads, tokens, HEAD_DIM, generator=generator).to(dtype).requires_grad_()

    query, key, value = leaf(HEADS), leaf(KV_HEADS), leaf(KV_HEADS)
    grad = torch.randn(1, tokens, HEADS, HEAD_DIM, generator=generator).to(dtype)  # (1, N, H, D)
    functions = {
        "kernel": lambda: cpu_attention.packed_native(query, key, value, cu, None),
        "sdpa": lambda: per_example_sdpa(query, key, value, cu, 0.0, None),
    }

    def timed(name: str) -> tuple[float, float]:
        """(forward, backward) seconds per call of `name`."""
        forward = backward = 0.0
        for _ in range(args.calls):
            started = time.perf_counter()
            out = functions[name]()
            middle = time.perf_counter()
            out.backward(grad)
            forward, backward = forward + middle - started, backward + time.perf_counter() - middle
        return forward / args.calls, backward / args.calls

    with torch.no_grad():
        difference = (functions["kernel"]().float() - functions["sdpa"]().float()).abs().max().item()
    for name in functions:  # warm-up: two calls each
        for _ in range(2):
            functions[name]().backward(grad)
    print(f"CPU: {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, {args.dtype}")
    print(f"one layer: {HEADS} heads / {KV_HEADS} kv heads x {HEAD_DIM}, a packed row of {tokens} tokens")
    ratios = []
    for round_ in range(args.rounds):
        order = list(functions) if round_ % 2 == 0 else list(reversed(functions))
        times = {name: timed(name) for name in order}
        ratio = sum(times["sdpa"]) / sum(times["kernel"])
        ratios.append(ratio)
        cells = "  ".join(f"{n} fwd {f * 1e3:6.1f} ms bwd {b * 1e3:6.1f} ms" for n, (f, b) in times.items())
        print(f"round {round_}: {cells}  sdpa/kernel x{ratio:.2f}")
    print(f"median sdpa/kernel x{statistics.median(ratios):.2f}; largest output difference {difference:.2e}")


if __name__ == "__main__":
    main()

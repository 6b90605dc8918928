"""Give memory that PyTorch frees on CPU back to the system, and bound oneDNN's per-shape caches.

PyTorch's CPU tensors come from glibc's `malloc`. glibc serves a request of at least the *mmap
threshold* with its own `mmap` (returned to the system by `free`) and smaller ones from its heap
(kept by the process after `free`, reused only by requests that fit the holes). The threshold is
dynamic: it starts at 128 KiB and rises to the size of every mmapped block freed, up to 32 MiB.
A training step frees activations of a few MiB each, so after the first step most of them live on
the heap; packed rows change length every step, the holes stop fitting, and the heap grows step
after step (on the 31.6M-parameter benchmark workload, bf16, packing, 12 steps: RSS between steps
1,002 MB with the dynamic threshold against 604 MB with a fixed 1 MiB one).

    M_MMAP_THRESHOLD = 8 MiB (fixed: setting it turns the dynamic rise off)

A block of >= 8 MiB (the large activations: a packed row's MLP and attention outputs, the loss
chunk) is then mmapped and goes back at `free`; smaller ones stay on the heap. Not lower: every
mmapped block costs an `mmap`/`munmap` and its first-touch page faults, and at 1 MiB that made the
LoRA step of that workload 1.6x slower (1,025 against 1,640 tokens/s, two alternating rounds of 16
steps on a quiet machine, `benchmarks.run_tunelab --method lora --steps 16`), for 110 MB less peak.
At 8 MiB: 1,640 tokens/s, peak 1,023 MB; glibc's dynamic default: 1,510 tokens/s, 1,042 MB.

Full fine-tuning takes 2 MiB (`threshold_for`). Its per-layer tensors of 2-8 MiB (float32 residual
rows, weight gradients, gate and up rows) freed on the heap leave holes that the next, differently
sized ones do not fit, and memory is what full fine-tuning runs out of: float32 weights, gradients
and AdamW states come first. Whole 26-step jobs on SmolLM2-135M (full, the `benchmarks.defaults`
config): peak 3,868 MB in 172 s at 8 MiB, 3,486 MB in 165 s at 2 MiB (1 MiB: 3,247 MB, but 233 s);
the 31.6M workload's full job: 1,237/1,249 MB in 84/86 s at 8 MiB, 1,156/1,178 MB in 84/89 s at
2 MiB. LoRA keeps 8 MiB: its whole workload job was 4-6% slower at 2 MiB (60/65 s against 57/61 s)
for 1-4% less memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_MMAP_THRESHOLD = -3  # glibc <malloc.h>
MMAP_THRESHOLD_BYTES = 8 << 20
FULL_TRAINING_THRESHOLD_BYTES = 2 << 20


def threshold_for(method: str) -> int:
    """The mmap threshold for a run of `method` (module docstring): 2 MiB for `full`, else 8 MiB."""
    return FULL_TRAINING_THRESHOLD_BYTES if method == "full" else MMAP_THRESHOLD_BYTES


def return_freed_memory(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes (see the module docstring). Leaves it alone
    off Linux/glibc and when the user chose one (`MALLOC_MMAP_THRESHOLD_` in the environment, which
    glibc reads at start-up). Returns whether the threshold is set by this call."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # no libc found, or a libc without mallopt (musl)
        return False
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1


SHAPE_CACHES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
"""oneDNN's primitive cache and ideep's (PyTorch's oneDNN wrapper) cache of matmul primitives."""
SHAPE_CACHE_CAPACITY = 16


def bound_shape_caches() -> None:
    """Keep at most 16 entries in each of oneDNN's per-shape caches (`SHAPE_CACHES`, default 1024)
    unless the user set them. Both are read at their first use, so this must run before the first
    bf16 matmul on CPU.

    Packed rows change length every step, and every new length makes new matmul primitives
    (JIT-compiled kernels, reordered buffers) that both caches keep: RSS grows ~11 MB per new length
    on the 31.6M workload (forward + backward, bf16 autocast; none with oneDNN off). Measured on 20
    random lengths (300-1500 tokens): 824 MB at the end with the defaults, 605 MB with 16 entries
    each (no slower: 88 s vs 73 s for the 20 steps on a shared machine); either cache alone halves
    the growth at most."""
    for name in SHAPE_CACHES:
        os.environ.setdefault(name, str(SHAPE_CACHE_CAPACITY))

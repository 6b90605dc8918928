"""Give memory that PyTorch frees on CPU back to the system, and bound oneDNN's per-shape caches.

PyTorch's CPU tensors come from glibc's `malloc`. glibc serves a request of at least the *mmap
threshold* with its own `mmap` (returned to the system by `free`) and smaller ones from its heap
(kept by the process after `free`, reused only by requests that fit the holes). The threshold is
dynamic: it starts at 128 KiB and rises to the size of every mmapped block freed, up to 32 MiB.
A training step frees activations of a few MiB each, so after the first step they all live on the
heap; packed rows change length every step, the holes stop fitting, and the heap grows step after
step. On the 31.6M-parameter benchmark workload (bf16, packing, 12 steps), peak RSS 1,049 MB with
the dynamic threshold and 919 MB with a fixed 1 MiB one; RSS between steps 1,002 MB vs 604 MB.

    M_MMAP_THRESHOLD = 1 MiB (fixed: setting it turns the dynamic rise off)

A block of >= 1 MiB then costs an `mmap`/`munmap` and its first-touch page faults; smaller ones
(most of a step's tensors by count) stay on the heap. Measured: no step-time change (forward and
backward of that model on packed rows of 300-1100 tokens, 4 alternating rounds: 3.61 s with a
32 MiB threshold, 3.53 s with 1 MiB, 3.61 s with 64 KiB; 64 KiB lowers the peak further, to 851 MB).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_MMAP_THRESHOLD = -3  # glibc <malloc.h>
MMAP_THRESHOLD_BYTES = 1 << 20


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold at 1 MiB (see the module docstring), once per process. Leaves it
    alone off Linux/glibc and when the user chose one (`MALLOC_MMAP_THRESHOLD_` in the environment,
    which glibc reads at start-up). Returns whether the threshold is set by this call."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # no libc found, or a libc without mallopt (musl)
        return False
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1


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

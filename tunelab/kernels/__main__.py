"""Build tunelab's C++ CPU kernels now, side by side: `python -m tunelab.kernels`.

Otherwise each kernel is built at its first use (`tunelab.kernels.native`), and the first run on a
new machine, or the first test that needs one, waits for the compiler: most of a build is the
compiler reading PyTorch's headers, ~50 s per kernel on a 2-core machine. `make setup` runs this
once. The builds are independent, so each runs in its own process: both together take about as long
as the slower one where there is a core for each (cold, on a 2-core Zen 3 EPYC: 57 s, against 107 s
one after the other). A kernel that cannot be built (no compiler, no ninja) is said in one line, as
at first use, and tunelab runs without it; the exit status is then 1.
"""

from __future__ import annotations

import subprocess
import sys
import time

KERNELS = ("cpu_fused", "cpu_attention")
"""The modules of `tunelab.kernels` with a compiled extension (each has `build() -> bool`)."""


def build_all(kernels: tuple[str, ...] = KERNELS) -> dict[str, bool]:
    """Build (or find cached) every kernel of `kernels`, one process each, all at once; whether each
    is available."""
    code = "import sys; from tunelab.kernels import {0}; sys.exit(0 if {0}.build() else 1)"
    processes = {name: subprocess.Popen([sys.executable, "-c", code.format(name)]) for name in kernels}
    return {name: process.wait() == 0 for name, process in processes.items()}


def main() -> int:
    started = time.perf_counter()
    built = build_all()
    for name, available in built.items():
        print(f"[tunelab] kernel {name}: {'ready' if available else 'not available (see above)'}")
    print(f"[tunelab] kernels: {time.perf_counter() - started:.0f} s")
    return 0 if all(built.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

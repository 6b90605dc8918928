"""One command as a whole job: wall time from process start to exit and peak RSS of its process tree.

    peak = max(max over samples of sum_{p in tree} RSS(p),  ru_maxrss of the child from wait4)

The tree (the process and all its descendants, e.g. a compiler building a kernel) is sampled every
`interval` seconds with psutil; `wait4`'s `ru_maxrss` is the kernel's exact high-water mark of the
child (and of its largest waited-for descendant), which catches a peak between two samples.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass

import psutil


@dataclass
class JobResult:
    seconds: float
    """Wall time from just before the process starts to its exit."""
    peak_rss_mb: float
    """Peak RSS of the process tree, MiB (see the module docstring)."""
    sampled_peak_mb: float
    """The sampled part alone: the largest sum over the tree seen at one sample."""
    returncode: int


def tree_rss(process: psutil.Process) -> int:
    """Bytes resident in `process` and all its descendants now (processes that vanish count 0)."""
    total = 0
    try:
        members = [process, *process.children(recursive=True)]
    except psutil.Error:
        return 0
    for member in members:
        try:
            total += member.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_job(cmd: list[str], env: dict[str, str], log_path: str, interval: float = 0.05) -> JobResult:
    """Run `cmd` (stdout and stderr to `log_path`), timing it and sampling its tree's memory."""
    peak = [0]
    done = threading.Event()
    with open(log_path, "w") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        watched = psutil.Process(proc.pid)

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], tree_rss(watched))
                done.wait(interval)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        done.set()
        sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    exact_mb = usage.ru_maxrss / 1024  # Linux: KiB
    sampled_mb = peak[0] / 2**20
    return JobResult(seconds, max(exact_mb, sampled_mb), sampled_mb, proc.returncode)

"""`tunelab.allocator.return_freed_memory`: a freed activation-sized tensor leaves the process.

With glibc's dynamic mmap threshold, freeing a 16 MiB block raises the threshold past it, so the
next 16 MiB block comes from the heap and stays resident after it is freed; with the threshold
fixed at 8 MiB every such block is mmapped and its pages go back at `free`.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

RSS_MIB = """
def rss_mib():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024
"""

PROBE = (
    """
import sys
import torch
if sys.argv[1] == "fixed":
    from tunelab.allocator import return_freed_memory
    assert return_freed_memory()
"""
    + RSS_MIB
    + """
block = torch.ones(4 << 20)  # 16 MiB
del block  # the dynamic threshold rises past 16 MiB here
block = torch.ones(4 << 20)
held = rss_mib()
del block
print(held - rss_mib())
"""
)


def returned_mib(mode: str, probe: str = PROBE) -> float:
    """MiB the probe's freed block gave back, run in a fresh process without MALLOC_ settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    proc = subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return float(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_freed_block_goes_back_to_the_system():
    assert returned_mib("dynamic") < 1  # what the fix is for: glibc keeps the block
    assert returned_mib("fixed") >= 15


def test_a_threshold_the_user_chose_is_left_alone(monkeypatch):
    from tunelab.allocator import return_freed_memory

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert return_freed_memory() is False


def test_train_bounds_onednn_shape_caches_unless_the_user_chose(monkeypatch, tmp_path):
    """`tunelab.train` sets both per-shape caches to 16 entries before anything runs; a value the
    user set is kept."""
    import tunelab
    from tunelab.allocator import SHAPE_CACHES
    from tunelab.errors import ConfigError

    monkeypatch.setenv(SHAPE_CACHES[0], "")  # recorded, so that the test's end restores it
    monkeypatch.delenv(SHAPE_CACHES[0])
    monkeypatch.setenv(SHAPE_CACHES[1], "64")
    with pytest.raises(ConfigError):  # no such config file: the caches are set before it is read
        tunelab.train(str(tmp_path / "missing.yaml"))
    assert os.environ[SHAPE_CACHES[0]] == "16"
    assert os.environ[SHAPE_CACHES[1]] == "64"


HOLE_PROBE = (
    """
import sys
import torch
from tunelab.allocator import return_freed_memory, threshold_for
assert return_freed_memory(threshold_for(sys.argv[1]))
"""
    + RSS_MIB
    + """
block = torch.ones(1 << 20)  # 4 MiB, below 8 MiB, above 2 MiB
pin = torch.ones(1 << 16)  # 256 KiB after it: the 4 MiB would be a hole, not the heap's top
held = rss_mib()
del block
print(held - rss_mib())
"""
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_full_fine_tuning_returns_4_mib_blocks_lora_keeps_them():
    """`threshold_for`: 2 MiB for `full` (its freed 4 MiB gradient-sized blocks leave the process),
    8 MiB for the others (such a block stays on the heap for the next one)."""
    returned = {method: returned_mib(method, HOLE_PROBE) for method in ("full", "lora")}
    assert returned["full"] >= 3.5
    assert returned["lora"] < 1

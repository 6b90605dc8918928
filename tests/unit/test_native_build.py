"""Building the C++ kernels (`tunelab.kernels.native`): a build killed midway must not hang the next
run. torch marks a build in progress with a `lock` file that makes every other process wait until it
is gone; a killed build leaves it behind."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tunelab.kernels import cpu_fused, native

pytestmark = pytest.mark.skipif(
    shutil.which("ninja") is None or (shutil.which("c++") is None and shutil.which("g++") is None),
    reason="no C++ compiler or ninja to build the kernels",
)


def test_a_lock_left_by_a_killed_build_is_cleared():
    """A stale `lock` in the kernel's build folder (what a build killed midway leaves): a new process
    takes tunelab's own build lock, removes it and loads the kernel, instead of waiting forever on it
    as torch alone would (the old code: this test timed out)."""
    assert cpu_fused.build()  # built and cached, so the process below only loads it
    build_name = f"tunelab_cpu_fused_{native.cpu_tag()}_{native.source_tag(cpu_fused.SOURCE)}"
    stale = native.build_folder(build_name) / "lock"
    stale.touch()
    try:
        code = "from tunelab.kernels import cpu_fused; assert cpu_fused.build()"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    finally:
        stale.unlink(missing_ok=True)
    assert done.returncode == 0, done.stderr
    assert "could not be built" not in done.stderr + done.stdout


def test_python_m_tunelab_kernels_builds_every_kernel():
    """`make setup` runs it: both kernels ready (cached by then, as here), one line each."""
    assert cpu_fused.build()
    done = subprocess.run(
        [sys.executable, "-m", "tunelab.kernels"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "[tunelab] kernel cpu_fused: ready" in lines
    assert "[tunelab] kernel cpu_attention: ready" in lines


def test_a_kernel_that_cannot_be_built_is_reported_not_raised():
    from tunelab.kernels.__main__ import build_all

    assert build_all(("cpu_fused", "no_such_kernel")) == {"cpu_fused": True, "no_such_kernel": False}

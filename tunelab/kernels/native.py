"""Building tunelab's C++ CPU kernels (`cpu_attention.cpp`, `cpu_fused.cpp`) at first use.

`torch.utils.cpp_extension.load` compiles a source with the machine's C++ compiler and ninja, once
per machine: the build is cached in torch's extensions folder (`TORCH_EXTENSIONS_DIR`, by default
under the home directory) and rebuilt when the source changes. The code is compiled for this CPU
(`-march=native`), so the cached build's name carries a hash of the CPU's instruction sets: a home
directory shared between machines never runs a build on a CPU that lacks its instructions.

torch marks a build in progress with a `lock` file in the build's folder and makes every other
process wait until it is gone. A build killed midway (Ctrl-C, an out-of-memory kill) leaves that file
behind, and every later run would wait forever. tunelab therefore builds under its own lock
(`fcntl.flock`, released by the system when its holder dies, `tunelab.disk_cache.locked`): whoever
holds it is the only tunelab process building that kernel, so a `lock` file found then is stale and
is removed before torch looks.
"""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path
from types import ModuleType

from tunelab import disk_cache
from tunelab.console import note


def cpu_tag() -> str:
    """A short hash of this CPU's instruction sets (the `flags` line of /proc/cpuinfo)."""
    try:
        flags = next(
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
        )
    except (OSError, StopIteration):
        flags = platform.processor()
    return hashlib.sha1(f"{platform.machine()} {flags}".encode()).hexdigest()[:10]


def source_tag(source: Path) -> str:
    """A short hash of where `source` lies. torch's build of an extension is rebuilt whenever the
    same name is built from another path (its ninja file names the source), so two checkouts or
    virtual environments sharing a home directory would rebuild each other's kernels at every
    switch (~40 s each); a name per location keeps one build each."""
    return hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:8]


def build_folder(build_name: str) -> Path:
    """The folder torch builds `build_name` in (created): `TORCH_EXTENSIONS_DIR` or torch's default
    root, then a folder per Python version and accelerator, then the name."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(build_name, verbose=False))


def build(name: str, source: Path, fallback: str) -> ModuleType | None:
    """The compiled module of `source` (named `{name}_{cpu_tag()}_{source_tag(source)}`), or None
    where it cannot be built: no compiler, no ninja, an unsupported platform. The reason is printed
    once, with what tunelab does instead (`fallback`)."""
    try:
        from torch.utils.cpp_extension import load

        native = "-march=native" if platform.machine() in ("x86_64", "AMD64") else "-mcpu=native"
        # -fopenmp: ATen's parallel_for is inline OpenMP code; it runs on the OpenMP runtime that
        # torch has already loaded, so the kernels use torch's threads.
        flags = ["-O3", native, "-fopenmp"]
        build_name = f"{name}_{cpu_tag()}_{source_tag(source)}"
        folder = build_folder(build_name)
        writable = "set TORCH_EXTENSIONS_DIR to a writable folder"
        with disk_cache.locked(folder.parent, build_name, "TORCH_EXTENSIONS_DIR", "kernel build", writable):
            (folder / "lock").unlink(missing_ok=True)  # stale: left by a build killed midway
            return load(name=build_name, sources=[str(source)], extra_cflags=flags)
    except Exception as error:
        note(f"[tunelab] the native CPU kernel {source.name} could not be built ({error}); {fallback}")
        return None

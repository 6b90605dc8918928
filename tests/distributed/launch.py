"""Helpers of the distributed tests: torchrun on 127.0.0.1 only (running tests/distributed/worker.py),
and comparing runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from tunelab.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 (for torchrun's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(plan: list[dict], folder: Path, nproc: int = 2) -> str:
    """Run the worker under torchrun on loopback only; return its combined output."""
    plan_file = folder / "plan.json"
    plan_file.write_text(json.dumps(plan))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(ROOT / "tests" / "distributed" / "worker.py"),
        str(plan_file),
    ]
    env = {
        **os.environ,
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    return output


def write_config(config, path: Path) -> str:
    """Write a `RunConfig` as YAML (what `tunelab train` reads); returns the path."""
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return str(path)


def metric(folder: Path, key: str) -> list[float]:
    """The values of `key` in a run's metrics rows."""
    return [row[key] for row in read_metrics(folder) if key in row]


def assert_close_weights(a: dict, b: dict, atol: float = 5e-5) -> None:
    """Same tensor names and shapes, values within `atol`."""
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].shape == b[name].shape, name
        assert torch.allclose(a[name], b[name], atol=atol), (name, (a[name] - b[name]).abs().max())

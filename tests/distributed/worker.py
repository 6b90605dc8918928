"""Run by the distributed tests under torchrun: train several configs in turn in one process group.

    python -m torch.distributed.run --nproc_per_node=2 --master_addr=127.0.0.1 --master_port=P \\
        tests/distributed/worker.py PLAN.json

PLAN.json is a list of jobs: `{"config": path, "resume_from": [run_dir, step] or null}` trains
that config; `{"call": "module:function", "args": [...]}` runs a check (tests/distributed/checks.py).
A job with `resume_from` first receives that run's checkpoint `step-N` and its metrics rows up to
N (rank 0 copies them, the other ranks wait): the folder an interrupted run would have left. It
then trains with `train.resume=true` in its config. One launch for all jobs keeps the tests short:
starting Python, torch and transformers in every process costs more than a tiny run.
"""

from __future__ import annotations

import gc
import importlib
import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import tunelab


def copy_interrupted(source: Path, step: int, target: Path) -> None:
    """Make `target` look like `source` interrupted after checkpoint `step`."""
    (target / "checkpoints").mkdir(parents=True, exist_ok=True)
    shutil.copytree(source / "checkpoints" / f"step-{step}", target / "checkpoints" / f"step-{step}")
    rows = [json.loads(line) for line in (source / "metrics.jsonl").read_text().splitlines() if line]
    (target / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= step))


def main(plan_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # tunelab uses the group it finds
    for job in json.loads(Path(plan_path).read_text()):
        if "call" in job:
            module, function = job["call"].split(":")
            getattr(importlib.import_module(module), function)(*job.get("args", []))
            gc.collect()
            dist.barrier()
            continue
        config = tunelab.load_config(job["config"])
        if job.get("resume_from"):
            if dist.get_rank() == 0:
                source, step = job["resume_from"]
                copy_interrupted(Path(source), step, Path(config.output_dir))
            dist.barrier()
        tunelab.train(config)
        gc.collect()  # free the finished run's DDP/FSDP objects on every rank before the next job
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

"""Checks of `tunelab.training.distributed` that need real ranks; run by worker.py under torchrun.

Each check asserts on every rank (a failure stops the launch) and rank 0 writes what the test
then compares into `folder/<check name>.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from tunelab.config import load_config
from tunelab.training.distributed import is_sharded
from tunelab.training.setup import setup_run


def fsdp_reference_generate_and_gather(folder: str, model_dir: str) -> None:
    """Under FSDP2 on 2 ranks:
    - `frozen_copy` (made before `wrap`) is sharded too and computes what the model computes;
    - `generate` ends on every rank although each rank generates a different number of tokens
      (each forward pass gathers parameters collectively: the ranks must keep stepping together);
    - `full_state_dict` of the model or a part of it gives its whole tensors on rank 0.
    """
    config = load_config(
        None,
        ["train.strategy=fsdp", "train.progress=false"],
        model={"name_or_path": model_dir},
        data={"train": "unused.jsonl"},
        output_dir=str(Path(folder) / "fsdp_checks"),
    )
    run = setup_run(config)
    reference = run.dist.frozen_copy(run.model)
    run.dist.wrap(run.model)
    model, rank = run.model, run.dist.rank
    assert all(is_sharded(p) for p in model.parameters())
    assert all(is_sharded(p) and not p.requires_grad for p in reference.parameters())

    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        same = torch.allclose(model(ids).logits, reference(ids).logits)
    assert same

    prompt = torch.tensor([[1, 7, 11][: 2 + rank]])  # different prompts and lengths per rank
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=3 + 5 * rank,
        min_new_tokens=3 + 5 * rank,
        do_sample=False,
        pad_token_id=0,
    )
    assert out.shape[1] == prompt.shape[1] + 3 + 5 * rank

    head = run.dist.full_state_dict(model.get_output_embeddings())
    whole = run.dist.full_state_dict(model)
    if run.is_main:
        base = load_file(Path(model_dir) / "model.safetensors")
        result = {
            "same_logits": same,
            "generated": out.shape[1] - prompt.shape[1],
            "head_equal": torch.equal(head["weight"], base["lm_head.weight"]),
            "model_equal": all(torch.equal(whole[k], base[k]) for k in base),
        }
        (Path(folder) / "fsdp_reference_generate_and_gather.json").write_text(json.dumps(result))


def a_signal_on_one_rank_stops_every_rank(folder: str, config_path: str) -> None:
    """SIGUSR1 reaches rank 1 only, during step 2: every rank ends step 2, the checkpoint of step 2
    is written, and every rank raises `Preempted` for step 2 (each rank asks the others after every
    step, so none goes on into a collective of step 3 alone)."""
    import os
    import signal

    import tunelab
    from tunelab.errors import Preempted
    from tunelab.training import loop

    rank = torch.distributed.get_rank()
    original = loop.StepLoop.end_step

    def end_step(self, step, figures, data_position):
        if step == 2 and rank == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return original(self, step, figures, data_position)

    loop.StepLoop.end_step = end_step
    try:
        tunelab.train(load_config(config_path))
        stopped = None
    except Preempted as stop:
        stopped = {"step": stop.step, "checkpoint": str(stop.checkpoint), "signal": stop.signal_name}
    finally:
        loop.StepLoop.end_step = original
    assert stopped is not None and stopped["step"] == 2, stopped
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, stopped)
    if rank == 0:
        (Path(folder) / "preemption.json").write_text(json.dumps(everyone))

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

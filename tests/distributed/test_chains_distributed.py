"""Chained runs under torchrun (2 gloo ranks, DDP): DPO and GRPO with LoRA starting from a LoRA SFT
run, each against one process with twice the batch. The reference is the SFT model on every rank:
DPO's first loss is exactly log 2 and GRPO's first KL is 0."""

from __future__ import annotations

import math

import pytest

import tunelab
from tests.distributed.launch import launch, metric, write_config
from tests.helpers import sft_config
from tests.recipes.test_dpo import dpo_config
from tests.recipes.test_grpo import grpo_config
from tunelab.trained import load_trained

LORA = {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "lm_head"]}
STEPS = ["train.max_steps=3", "train.log_every=1", "train.lr=3e-3"]
CHAINS = {"dpo": (dpo_config, 4, {}), "grpo": (grpo_config, 2, {"num_generations": 4})}


@pytest.fixture(scope="module")
def chained_runs(tiny_model_dirs, instruction_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed-chains")
    sft_steps = ["train.max_steps=6", "train.lr=1e-2", "eval.generate=false"]
    tunelab.train(
        sft_config(tiny_model_dirs["llama"], instruction_data[0], root / "sft", *sft_steps, method=LORA)
    )
    plan = []
    for name, (build, batch, options) in CHAINS.items():
        single = [*STEPS, f"train.batch_size={2 * batch}"]
        tunelab.train(build(root / "sft", root / f"single_{name}", *single, method=LORA, **options))
        two = [*STEPS, f"train.batch_size={batch}", "train.strategy=ddp"]
        config = build(root / "sft", root / name, *two, method=LORA, **options)
        plan.append({"config": write_config(config, root / f"{name}.yaml")})
    launch(plan, root)
    return root


@pytest.mark.slow  # two gloo launches (~50 s); the chains themselves are tested in one process (tests/recipes/test_chains.py)
@pytest.mark.parametrize("name", list(CHAINS))
def test_a_chain_on_two_ranks_equals_one_process(chained_runs, name):
    single, multi = chained_runs / f"single_{name}", chained_runs / name
    assert metric(multi, "loss") == pytest.approx(metric(single, "loss"), rel=1e-4, abs=1e-5)
    if name == "dpo":
        assert metric(multi, "loss")[0] == pytest.approx(math.log(2), abs=1e-5)
    else:
        assert metric(multi, "kl")[0] == pytest.approx(0.0, abs=1e-5)
    model, _, method = load_trained(multi, device="cpu")
    assert method == "lora"

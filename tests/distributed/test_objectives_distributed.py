"""Every objective beyond sft under torchrun: 2 CPU processes (gloo) x batch b against 1 process x
batch 2b, for reward, dpo, ppo and grpo, under DDP and FSDP2, with full fine-tuning and LoRA.

The online objectives sample with keys (tunelab/rl/rollouts.py), so the 2 ranks draw the
responses the single process draws, and their whitening, loss units and metrics are global: the
logged figures and the trained weights agree up to floating-point order. Every case here takes one
mini-batch per pass: with `num_mini_batches` > 1 each rank shuffles its own rows into mini-batches
(a global mini-batch is the union of the ranks' parts: one half from each rank's rows, which a
single process's shuffle of all rows need not give), so such a run takes different updates from
one process and has nothing exact to be compared with. One torchrun launch trains every
distributed run (tests/distributed/worker.py); the single-process references run in this process.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from safetensors.torch import load_file

import tunelab
from tests.distributed.launch import launch, metric, write_config
from tests.recipes.test_dpo import dpo_config
from tests.recipes.test_grpo import grpo_config
from tests.recipes.test_ppo import ppo_config
from tests.recipes.test_reward import reward_config
from tunelab.trained import load_trained
from tunelab.training.metrics import read_metrics

# Every objective under 2 ranks (~45 s of launches): `make test-slow`, to keep `make test` within its
# 10-minute budget; it keeps DDP and FSDP SFT runs (test_distributed_training.py) and test_sharded.py.
pytestmark = pytest.mark.slow

LORA = {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "lm_head"]}
STEPS = ["train.max_steps=4", "train.save_every=2", "train.log_every=1"]


@dataclass
class Case:
    """One objective run on 2 ranks against 1 process with twice the batch."""

    build: Callable  # a recipe test's config builder (tests/recipes)
    method: dict | None  # None: full fine-tuning
    batch: int  # per rank; the single process takes twice as many
    strategy: str
    compared: tuple[str, ...]  # metrics compared at every step
    options: dict = field(default_factory=dict)  # objective options


PPO_FIGURES = ("loss", "reward", "kl", "value_loss", "response_length", "entropy", "grad_norm")
GRPO_FIGURES = ("loss", "reward", "reward_std", "kl", "completion_length", "grad_norm")
RUNS = {
    "reward_ddp_full": Case(reward_config, None, 4, "ddp", ("loss", "accuracy", "grad_norm")),
    "reward_fsdp_lora": Case(reward_config, LORA, 4, "fsdp", ("loss", "accuracy", "grad_norm")),
    "dpo_ddp_lora": Case(dpo_config, LORA, 4, "ddp", ("loss", "reward_margin", "grad_norm")),
    "dpo_fsdp_full": Case(dpo_config, None, 4, "fsdp", ("loss", "reward_margin", "grad_norm")),
    "ppo_ddp_full": Case(ppo_config, None, 4, "ddp", PPO_FIGURES, {"ppo_epochs": 2}),
    "ppo_fsdp_lora": Case(ppo_config, LORA, 4, "fsdp", PPO_FIGURES, {"ppo_epochs": 2}),
    "grpo_ddp_lora": Case(grpo_config, LORA, 2, "ddp", GRPO_FIGURES, {"num_generations": 4}),
    "grpo_fsdp_full": Case(
        grpo_config,
        None,
        2,
        "fsdp",
        (*GRPO_FIGURES, "clip_frac"),
        {"num_generations": 4, "num_iterations": 2, "loss_aggregation": "sequence"},
    ),
}


@pytest.fixture(scope="module")
def objective_runs(tiny_model_dirs, tmp_path_factory):
    """Output folders of every single-process reference and 2-rank run (one launch)."""
    root = tmp_path_factory.mktemp("distributed-objectives")
    model_dir = tiny_model_dirs["llama"]
    plan = []
    for name, case in RUNS.items():
        common = [*STEPS, "train.lr=3e-3"]
        single = [*common, f"train.batch_size={2 * case.batch}"]
        tunelab.train(
            case.build(model_dir, root / f"single_{name}", *single, method=case.method, **case.options)
        )
        two = [*common, f"train.batch_size={case.batch}", f"train.strategy={case.strategy}"]
        config = case.build(model_dir, root / name, *two, method=case.method, **case.options)
        plan.append({"config": write_config(config, root / f"{name}.yaml")})
        if name == "ppo_ddp_full":  # resumed from its step-2 checkpoint
            resumed = case.build(
                model_dir,
                root / f"{name}_resumed",
                *two,
                "train.resume=true",
                method=case.method,
                **case.options,
            )
            plan.append(
                {
                    "config": write_config(resumed, root / f"{name}_resumed.yaml"),
                    "resume_from": [str(root / name), 2],
                }
            )
    launch(plan, root)
    return root


@pytest.mark.parametrize("name", list(RUNS))
def test_two_ranks_equal_one_process_with_double_batch(objective_runs, tiny_model_dirs, name):
    """Same logged losses and figures step by step, and the same trained weights in `final/`."""
    single, multi = objective_runs / f"single_{name}", objective_runs / name
    assert [r["step"] for r in read_metrics(multi)] == [1, 2, 3, 4]
    for key in RUNS[name].compared:
        assert metric(multi, key) == pytest.approx(metric(single, key), rel=1e-4, abs=1e-5), key
    files = sorted(p.name for p in (single / "final").iterdir())
    assert sorted(p.name for p in (multi / "final").iterdir()) == files
    weights = next(f for f in files if f.endswith("model.safetensors"))
    assert_same_updates(multi / "final" / weights, single / "final" / weights, tiny_model_dirs["llama"])


@pytest.mark.parametrize("name", [name for name in RUNS if name.startswith(("reward", "dpo"))])
def test_held_out_figures_before_training_equal_one_process(objective_runs, name):
    """The held-out figures taken before training (`*_before`; the reward and DPO runs here have
    held-out pairs) are those of one process: each recipe takes them once `run.dist.wrap` ran,
    which under FSDP is where each rank reads its shard of the weights (before it, the model has
    no weights yet)."""
    single, multi = (
        json.loads((run / "summary.json").read_text())
        for run in (objective_runs / f"single_{name}", objective_runs / name)
    )
    before = {key: value for key, value in single.items() if key.endswith("_before")}
    assert before
    for key, value in before.items():
        assert multi[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


def assert_same_updates(got_file, expected_file, model_dir, rel=1e-2):
    """The training updates (trained - base weights; a LoRA's tensors themselves) agree within `rel`
    of their norm, tensor by tensor. (Adam turns floating-point noise in gradients as small as its
    eps into visible differences of single elements, so elementwise tolerances would be arbitrary.)"""
    got, expected = load_file(got_file), load_file(expected_file)
    base = {} if got_file.name.startswith("adapter") else load_file(model_dir / "model.safetensors")
    assert sorted(got) == sorted(expected)
    for name in got:
        start = base.get(name, torch.zeros_like(got[name]))
        update, reference = got[name] - start, expected[name] - start
        assert torch.linalg.norm(update - reference) <= rel * torch.linalg.norm(reference) + 1e-7, name


def test_reward_head_gathered_under_fsdp(objective_runs):
    """The reward head trained under FSDP2 (sharded with the root) is saved whole and scores as the
    single-process one does."""
    single, multi = objective_runs / "single_reward_fsdp_lora", objective_runs / "reward_fsdp_lora"
    key = "base_model.model.score.weight"  # the head, as the classifier's score in the SEQ_CLS adapter
    a, b = (load_file(run / "final" / "adapter_model.safetensors")[key] for run in (multi, single))
    assert a.shape == b.shape == (1, 64)
    assert torch.linalg.norm(a - b) <= 1e-3 * torch.linalg.norm(b)
    summary = json.loads((multi / "summary.json").read_text())
    assert summary["eval_accuracy"] == pytest.approx(
        json.loads((single / "summary.json").read_text())["eval_accuracy"], abs=1e-6
    )


def test_ppo_resume_under_two_ranks_equals_no_stop(objective_runs):
    """A 2-rank PPO run resumed from step 2 samples the same rollouts and logs the same figures."""
    straight, resumed = objective_runs / "ppo_ddp_full", objective_runs / "ppo_ddp_full_resumed"
    assert [r["step"] for r in read_metrics(resumed)] == [1, 2, 3, 4]
    for key in ("loss", "reward", "kl", "response_length"):
        assert metric(resumed, key) == pytest.approx(metric(straight, key), rel=1e-6, abs=1e-7), key


@pytest.mark.parametrize("name", ["dpo_ddp_lora", "grpo_fsdp_full"])
def test_policy_trained_on_two_ranks_loads_on_one_device(objective_runs, name):
    """A LoRA policy trained under DDP and a full one trained under FSDP2 load on one device and
    compute what the single-process policies compute."""
    model, tokenizer, method = load_trained(objective_runs / name, device="cpu")
    reference, _, _ = load_trained(objective_runs / f"single_{name}", device="cpu")
    assert method == (RUNS[name].method or {"name": "full"})["name"]
    ids = tokenizer("### Instruction:\nSay hi.\n\n### Response:\n", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-4)

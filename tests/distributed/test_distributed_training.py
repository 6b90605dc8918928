"""Two CPU processes (gloo, 127.0.0.1) against one: DDP and FSDP2, LoRA under FSDP2, packing under
both, resume.

One torchrun launch trains every distributed run of this module and runs the checks of
tests/distributed/checks.py (tests/distributed/worker.py); the single-process references run in
this process. Each pair uses the same seeded data order: 2 ranks x batch b take the rows of the
same global batches as 1 process x batch 2b, so their losses agree up to floating-point
summation order.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import tunelab
from tests.distributed.launch import assert_close_weights, launch, metric, write_config
from tests.helpers import sft_config
from tunelab.trained import load_trained
from tunelab.training.metrics import read_metrics

COMMON = ["train.max_steps=6", "train.save_every=3", "train.lr=3e-3"]
LORA = {"name": "lora", "r": 4, "alpha": 8}
EVAL = ["train.eval_every=3", "eval.num_examples=4", "eval.max_new_tokens=4"]
PACKED = "data.packing=true"


@pytest.fixture(scope="module")
def runs(tiny_model_dirs, instruction_data, tmp_path_factory):
    """Output folders of the single-process references and of the 2-rank runs (one launch)."""
    root = tmp_path_factory.mktemp("distributed")
    model_dir, (train_file, eval_file) = tiny_model_dirs["llama"], instruction_data

    def config(name, *overrides, method=None, eval_data=False):
        return sft_config(
            model_dir,
            train_file,
            root / name,
            *COMMON,
            *overrides,
            method=method,
            eval_file=eval_file if eval_data else None,
        )

    # References: one process, batch 2b.
    tunelab.train(config("single_full", "train.batch_size=8", "train.grad_accum=2", *EVAL, eval_data=True))
    tunelab.train(config("single_lora", "train.batch_size=8", method=LORA))
    # Two ranks, batch b.
    two = ["train.batch_size=4"]
    jobs = {
        "ddp_full": config("ddp_full", *two, "train.grad_accum=2", "train.strategy=ddp"),
        "fsdp_full": config(
            "fsdp_full", *two, "train.grad_accum=2", "train.strategy=fsdp", *EVAL, eval_data=True
        ),
        "fsdp_lora": config("fsdp_lora", *two, "train.strategy=fsdp", method=LORA),
        "fsdp_lora_resumed": config(
            "fsdp_lora_resumed", *two, "train.strategy=fsdp", "train.resume=true", method=LORA
        ),
        # Packed: each rank packs its 4 examples into one row (single_lora pads its 8).
        "ddp_packed_lora": config("ddp_packed_lora", *two, "train.strategy=ddp", PACKED, method=LORA),
        "fsdp_packed_lora": config("fsdp_packed_lora", *two, "train.strategy=fsdp", PACKED, method=LORA),
    }
    # GPT-2 keeps its dropout (0.1): its resume checks every rank's RNG state.
    gpt2 = ["train.batch_size=4", "train.strategy=ddp"]
    jobs["ddp_gpt2"] = sft_config(tiny_model_dirs["gpt2"], train_file, root / "ddp_gpt2", *COMMON, *gpt2)
    jobs["ddp_gpt2_resumed"] = sft_config(
        tiny_model_dirs["gpt2"], train_file, root / "ddp_gpt2_resumed", *COMMON, *gpt2, "train.resume=true"
    )
    plan = [
        {
            "config": write_config(cfg, root / f"{name}.yaml"),
            "resume_from": [str(root / name.removesuffix("_resumed")), 3]
            if name.endswith("_resumed")
            else None,
        }
        for name, cfg in jobs.items()
    ]
    checks = "tests.distributed.checks:fsdp_reference_generate_and_gather"
    plan.append({"call": checks, "args": [str(root), str(model_dir)]})
    preempted = write_config(config("ddp_preempted", *two, "train.strategy=ddp"), root / "ddp_preempted.yaml")
    plan.append(
        {
            "call": "tests.distributed.checks:a_signal_on_one_rank_stops_every_rank",
            "args": [str(root), preempted],
        }
    )
    output = launch(plan, root)
    return root, output, len(jobs)  # + 1 setup_run in the check, + 1 preempted run (no summary)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process_with_double_batch(runs, strategy):
    """2 ranks x batch 4 x accumulation 2 take the steps of 1 process x batch 8 x accumulation 2:
    same losses, gradient norms, token counts and final weights; `final/` has the same files."""
    root, _, _ = runs
    single, multi = root / "single_full", root / f"{strategy}_full"
    assert [r["step"] for r in read_metrics(multi) if "loss" in r] == list(range(1, 7))
    assert metric(multi, "loss") == pytest.approx(metric(single, "loss"), rel=1e-5)
    assert metric(multi, "grad_norm") == pytest.approx(metric(single, "grad_norm"), rel=1e-4)
    assert metric(multi, "tokens") == metric(single, "tokens")
    files = sorted(p.name for p in (single / "final").iterdir())
    assert sorted(p.name for p in (multi / "final").iterdir()) == files
    assert_close_weights(
        load_file(multi / "final" / "model.safetensors"), load_file(single / "final" / "model.safetensors")
    )


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_packed_two_ranks_equal_one_padded_process_with_double_batch(runs, strategy):
    """`data.packing` under DDP and FSDP2: 2 ranks, each packing its 4 examples into one row (on
    CPU through the C++ attention kernel), take the steps of 1 process padding 8 examples: same
    losses, gradient norms, token counts and LoRA weights."""
    root, output, _ = runs
    single, multi = root / "single_lora", root / f"{strategy}_packed_lora"
    assert [r["step"] for r in read_metrics(multi)] == list(range(1, 7))
    assert metric(multi, "loss") == pytest.approx(metric(single, "loss"), rel=1e-5)
    assert metric(multi, "grad_norm") == pytest.approx(metric(single, "grad_norm"), rel=1e-4)
    assert metric(multi, "tokens") == metric(single, "tokens")
    assert_close_weights(
        load_file(multi / "final" / "adapter_model.safetensors"),
        load_file(single / "final" / "adapter_model.safetensors"),
    )
    assert output.count("[tunelab] packing: one padding-free row per micro-batch, tunelab_packed") == 2


def test_fsdp_evaluation_matches_one_process(runs):
    """Evaluation under FSDP (every rank runs the sharded model in step) gives the same eval loss,
    and generation for exact match runs to the end."""
    root, _, _ = runs
    single = json.loads((root / "single_full" / "summary.json").read_text())
    multi = json.loads((root / "fsdp_full" / "summary.json").read_text())
    assert multi["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-5)
    assert metric(root / "fsdp_full", "eval_loss") == pytest.approx(
        metric(root / "single_full", "eval_loss"), rel=1e-5
    )
    assert "exact_match" in multi


def test_fsdp_lora_adapter_loads_on_one_device(runs):
    """LoRA under FSDP2 (frozen sharded base, trainable adapters) follows the single-process run
    and saves a PEFT-format adapter that loads on one device and computes what the reference does."""
    root, _, _ = runs
    single, multi = root / "single_lora", root / "fsdp_lora"
    assert metric(multi, "loss") == pytest.approx(metric(single, "loss"), rel=1e-5)
    assert sorted(p.name for p in (multi / "final").iterdir()) == sorted(
        p.name for p in (single / "final").iterdir()
    )
    assert_close_weights(
        load_file(multi / "final" / "adapter_model.safetensors"),
        load_file(single / "final" / "adapter_model.safetensors"),
    )
    model, tokenizer, method = load_trained(multi, device="cpu")
    reference, _, _ = load_trained(single, device="cpu")
    assert method == "lora"
    ids = tokenizer("### Instruction:\nWhat is 2 plus 3?\n\n### Response:\n", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-4)


@pytest.mark.parametrize("name", ["ddp_gpt2", "fsdp_lora"])
def test_resume_under_two_ranks_equals_no_stop(runs, name):
    """A 2-rank run resumed from its step-3 checkpoint logs the losses of the run that never
    stopped, and ends with the same weights (GPT-2 with dropout: each rank's RNG is restored)."""
    root, _, _ = runs
    straight, resumed = root / name, root / f"{name}_resumed"
    assert [r["step"] for r in read_metrics(resumed)] == list(range(1, 7))
    assert metric(resumed, "loss") == pytest.approx(metric(straight, "loss"), rel=1e-6)
    weights = "adapter_model.safetensors" if name.endswith("lora") else "model.safetensors"
    assert_close_weights(
        load_file(resumed / "final" / weights), load_file(straight / "final" / weights), atol=1e-6
    )


def test_distributed_checkpoints_ddp_whole_fsdp_sharded(runs):
    """DDP writes the single-device format. FSDP writes no whole tensor: every rank's rows of the
    trainable parameters and of their optimizer state, under the single-process names, in its own
    file of `sharded/` (tests/distributed/test_sharded.py resumes them). Both keep every rank's
    RNG state."""
    root, _, _ = runs
    single = root / "single_lora" / "checkpoints" / "step-3"
    ddp = root / "ddp_gpt2" / "checkpoints" / "step-3"
    assert sorted(p.name for p in ddp.iterdir()) == sorted(p.name for p in single.iterdir())
    multi = root / "fsdp_lora" / "checkpoints" / "step-3"
    names = {"trainable.safetensors", "optimizer.safetensors"}
    assert sorted(p.name for p in multi.iterdir()) == sorted(
        {p.name for p in single.iterdir()} - names | {"sharded"}
    )
    shards = [load_file(f) for f in sorted((multi / "sharded").iterdir())]
    assert len(shards) == 2
    whole = load_file(single / "trainable.safetensors")
    for name, tensor in whole.items():  # rows split over the two files
        assert sum(s[f"model.{name}"].shape[0] for s in shards) == tensor.shape[0]
        assert shards[0][f"model.{name}"].shape[0] < tensor.shape[0]
        assert f"optimizer.{name}.exp_avg" in shards[0]
    rng = load_file(multi / "rng.safetensors")
    assert {"torch", "rank0.torch", "rank1.torch"} <= set(rng)
    state = json.loads((multi / "state.json").read_text())
    assert state["step"] == 3 and state["data_position"] == 3 and len(state["python_rng_ranks"]) == 2


def test_fsdp_reference_copy_generation_and_gathering(runs):
    """Under FSDP2 a frozen reference copy is sharded and agrees with the model, `generate` with a
    different length on each rank completes, and a module's whole tensors reach rank 0
    (tests/distributed/checks.py)."""
    root, _, _ = runs
    result = json.loads((root / "fsdp_reference_generate_and_gather.json").read_text())
    assert result == {"same_logits": True, "generated": 3, "head_equal": True, "model_equal": True}


def test_only_rank_zero_prints(runs):
    """Each run's report lines appear once, not once per rank."""
    _, output, jobs = runs
    assert output.count("[tunelab] method ") == jobs + 2  # the two checks set up runs too
    assert output.count("final_dir=") == jobs


def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(runs):
    """SIGUSR1 on rank 1 alone (tests/distributed/checks.py): both ranks stop after step 2 with
    the checkpoint of step 2, written in the single-device format."""
    root, _, _ = runs
    stops = json.loads((root / "preemption.json").read_text())
    assert [s["step"] for s in stops] == [2, 2]
    assert stops[1]["signal"] == "SIGUSR1" and stops[0]["signal"] != "SIGUSR1"
    assert all(s["checkpoint"].endswith("step-2") for s in stops)
    assert (root / "ddp_preempted" / "checkpoints" / "step-2" / "trainable.safetensors").is_file()
    assert [r["step"] for r in read_metrics(root / "ddp_preempted")] == [1, 2]

"""Sharded loading and sharded checkpoints under FSDP2 (tunelab/training/sharded_load.py,
tunelab/training/sharded_checkpoint.py), on 2 and 4 gloo ranks on 127.0.0.1 and in one process.

Two launches (tests/distributed/worker.py): 2 ranks (peak memory, then sharded-loaded runs and a
run that falls back to the whole load) and 4 ranks (peak memory, then runs resumed from the 2-rank
checkpoints). The memory check is each launch's first job: VmHWM is a peak over the process's
life. The tiny model here ties its embeddings and is saved as several safetensors files with an
index. The last tests run in this process: the rows each rank reads from a file, and which sources
are read rank by rank.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import tunelab
from tests.distributed.launch import assert_close_weights, launch, metric, write_config
from tests.distributed.worker import copy_interrupted
from tests.helpers import sft_config
from tunelab.config import load_config
from tunelab.errors import TunelabError
from tunelab.tiny import build_tiny_model_dir, tiny_config
from tunelab.training.metrics import read_metrics

STEPS = ["train.max_steps=6", "train.save_every=3", "train.lr=3e-3"]
METHODS = {
    "full": None,
    "lora": {"name": "lora", "r": 4, "alpha": 8},
    "dora": {"name": "lora", "r": 4, "use_dora": True, "target_modules": "all-linear"},
}
WHOLE_LOAD_CHECKS = {  # sharded model against a whole load, tensor by tensor
    "bf16_full": (["model.dtype=bfloat16", "train.precision=bf16"], None),
    "dora_saved": (
        [],
        {
            "name": "lora",
            "r": 4,
            "use_dora": True,
            "target_modules": "all-linear",
            "modules_to_save": ["lm_head"],
        },
    ),
}
SHARDED_LINE = "[tunelab] fsdp: each of the {} ranks reads only its shard of the weights"
FALLBACK_LINE = "[tunelab] fsdp: every rank loads the whole model (the model is an earlier run"


WIDE_MIB = 318.0  # the float32 weights of `wide_model`


def wide_model(folder, tokenizer):
    """A model whose weights dominate a process's memory: 2 Llama layers of width 1024, a vocabulary
    of 32000, untied: 83M float32 parameters, 318 MiB (`WIDE_MIB`, checked here)."""
    config = tiny_config("llama", vocab_size=32000, hidden=1024, layers=2, heads=16, kv_heads=4)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) * 4 / 2**20 == pytest.approx(WIDE_MIB, abs=0.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def memory_job(root, name):
    return {"call": "tests.distributed.sharded_checks:peak_memory", "args": [str(root), str(root / name)]}


@pytest.fixture(scope="module")
def sharded_runs(tiny_tokenizer, instruction_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed-sharded")
    train_file = instruction_data[0]
    model_dir = build_tiny_model_dir(root / "tied", "llama", tiny_tokenizer, tie_embeddings=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    (model_dir / "model.safetensors").unlink()
    model.save_pretrained(model_dir, max_shard_size="100KB")  # several files + model.safetensors.index.json
    assert (model_dir / "model.safetensors.index.json").is_file()
    wide = wide_model(root / "wide", tiny_tokenizer)
    memory = load_config(
        None,
        ["train.strategy=fsdp", "train.progress=false"],
        model={"name_or_path": str(wide)},
        data={"train": "unused.jsonl"},
        output_dir=str(root / "memory"),
    )
    write_config(memory, root / "memory.yaml")

    def config(name, *overrides, method=None, model=model_dir):
        cfg = sft_config(model, train_file, root / name, *STEPS, *overrides, method=method)
        return {"config": write_config(cfg, root / f"{name}.yaml")}

    for name, method in METHODS.items():  # references: one process, batch 8
        tunelab.train(sft_config(model_dir, train_file, root / f"single_{name}", *STEPS, method=method))
    two = ["train.batch_size=4", "train.strategy=fsdp"]
    plan = [memory_job(root, "memory.yaml")]
    plan += [config(f"fsdp_{name}", *two, method=method) for name, method in METHODS.items()]
    plan.append(config("fsdp_chained", *two, method=METHODS["lora"], model=root / "single_lora"))
    for name, (overrides, method) in WHOLE_LOAD_CHECKS.items():
        path = config(name, *two, *overrides, method=method)["config"]
        plan.append(
            {"call": "tests.distributed.sharded_checks:sharded_equals_whole", "args": [str(root), path, name]}
        )
    two_output = launch(plan, root, nproc=2)
    four = ["train.batch_size=2", "train.strategy=fsdp", "train.resume=true"]
    plan = [memory_job(root, "memory.yaml")]
    for name in ("full", "lora"):
        job = config(f"fsdp4_{name}_resumed", *four, method=METHODS[name])
        plan.append({**job, "resume_from": [str(root / f"fsdp_{name}"), 3]})
    launch(plan, root, nproc=4)
    # One process resumes the checkpoint the 2 ranks wrote.
    copy_interrupted(root / "fsdp_lora", 3, root / "single_lora_resumed")
    tunelab.train(
        sft_config(
            model_dir,
            train_file,
            root / "single_lora_resumed",
            *STEPS,
            "train.resume=true",
            method=METHODS["lora"],
        )
    )
    shutil.rmtree(wide)
    return root, two_output


def above_baseline(root, world: int) -> list[float]:
    """Each rank's peak memory above its baseline (MiB) in the launch of `world` ranks."""
    return [
        (peak - baseline) / 1024 for baseline, peak in json.loads((root / f"peak-{world}.json").read_text())
    ]


def test_per_rank_peak_memory_falls_with_the_number_of_ranks(sharded_runs):
    """The 318 MiB model set up and sharded (and every weight read once, as a step would): each
    rank's peak above its baseline (everything imported, no model) holds its share of the weights
    and at most 40 MiB more, where a whole load would hold all 318 MiB (332 MiB measured in one
    process; the ranks measured 184 MiB of 2 and 103 MiB of 4)."""
    root, _ = sharded_runs
    for world in (2, 4):
        share = WIDE_MIB / world
        for above in above_baseline(root, world):
            assert share <= above <= share + 40, (world, above)


@pytest.mark.parametrize("name", list(METHODS))
def test_sharded_loading_equals_one_process(sharded_runs, name):
    """Each rank reads only its rows of the (tied, index-split) checkpoint; the method's tensors
    (LoRA A drawn in the same RNG order, DoRA magnitudes from the loaded rows) are those of one
    process: 2 ranks x batch 4 log the losses of 1 process x batch 8 and save the same `final/`."""
    root, output = sharded_runs
    single, multi = root / f"single_{name}", root / f"fsdp_{name}"
    assert output.count(SHARDED_LINE.format(2)) == 1 + len(METHODS) + len(WHOLE_LOAD_CHECKS)
    assert metric(multi, "loss") == pytest.approx(metric(single, "loss"), rel=1e-5)
    files = sorted(p.name for p in (single / "final").iterdir())
    assert sorted(p.name for p in (multi / "final").iterdir()) == files
    weights = next(f for f in files if f.endswith(".safetensors"))
    assert_close_weights(load_file(multi / "final" / weights), load_file(single / "final" / weights))


@pytest.mark.parametrize("name", list(WHOLE_LOAD_CHECKS))
def test_a_sharded_model_equals_a_whole_load(sharded_runs, name):
    """Read rank by rank and gathered, the model equals the same config loaded whole, exactly:
    bfloat16 base weights cast to float32 master weights (full fine-tuning under bf16), DoRA
    magnitudes from the loaded rows, LoRA's trainable copy of the tied `lm_head`
    (`modules_to_save`: a deep copy of a placeholder is read from the checkpoint too)."""
    root, _ = sharded_runs
    result = json.loads((root / f"{name}.json").read_text())
    assert result == {"read_by_rank": True, "differ": [], "extra": []}


def test_a_checkpoint_written_on_two_ranks_resumes_on_four(sharded_runs):
    """The 2-rank checkpoint holds each rank's rows, never a whole tensor, and no pickle: one
    safetensors file per rank under `sharded/` (their layout in JSON headers). 4 ranks x batch 2
    resume it (DCP reshards) and log the losses of the 2-rank run that never stopped."""
    root, _ = sharded_runs
    checkpoint = root / "fsdp_lora" / "checkpoints" / "step-3"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "config.yaml",
        "optimizer.json",
        "rng.safetensors",
        "sharded",
        "state.json",
    ]
    assert sorted(p.suffix for p in (checkpoint / "sharded").iterdir()) == [".safetensors"] * 2
    for name in ("full", "lora"):
        straight, resumed = root / f"fsdp_{name}", root / f"fsdp4_{name}_resumed"
        assert [r["step"] for r in read_metrics(resumed) if "loss" in r] == list(range(1, 7))
        assert metric(resumed, "loss") == pytest.approx(metric(straight, "loss"), rel=1e-5)
        assert metric(resumed, "loss") == pytest.approx(metric(root / f"single_{name}", "loss"), rel=1e-5)


def test_one_process_resumes_a_sharded_checkpoint(sharded_runs):
    """Without torchrun, the FSDP checkpoint is read whole (DCP without a process group): the
    resumed process logs the losses of the 2-rank run that never stopped, and its adapter."""
    root, _ = sharded_runs
    straight, resumed = root / "fsdp_lora", root / "single_lora_resumed"
    assert metric(resumed, "loss") == pytest.approx(metric(straight, "loss"), rel=1e-5)
    assert_close_weights(
        load_file(resumed / "final" / "adapter_model.safetensors"),
        load_file(straight / "final" / "adapter_model.safetensors"),
    )


def test_an_earlier_run_is_loaded_whole_and_says_why(sharded_runs):
    """A run that starts from an earlier run's folder (its LoRA merged on a whole load) cannot be
    read shard by shard: it prints one line saying so, and trains."""
    root, output = sharded_runs
    assert output.count(FALLBACK_LINE) == 1
    losses = metric(root / "fsdp_chained", "loss")
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert (root / "fsdp_chained" / "final" / "adapter_model.safetensors").is_file()


def test_a_sharded_checkpoint_of_another_method_is_one_clear_error(sharded_runs, instruction_data, tmp_path):
    """One process resuming the 2-rank LoRA checkpoint with full fine-tuning: one line naming the
    checkpoint, not a DCP traceback."""
    root, _ = sharded_runs
    copy_interrupted(root / "fsdp_lora", 3, tmp_path / "other")
    config = sft_config(root / "tied", instruction_data[0], tmp_path / "other", *STEPS, "train.resume=true")
    with pytest.raises(TunelabError, match=r"checkpoint .*step-3.*another method config"):
        tunelab.train(config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("world", [1, 3, 4])
def test_each_rank_reads_its_rows_from_the_file(tmp_path, monkeypatch, dtype, world):
    """`read_rows` reads, block by block, the rows FSDP2 gives each rank (`local_rows`: the chunks
    of `torch.chunk`), cast on the way; the ranks' rows rebuild the saved tensor."""
    from safetensors.torch import save_file

    from tunelab.training import sharded_load

    monkeypatch.setattr(sharded_load, "BLOCK_BYTES", 40)  # several blocks per rank
    tensors = {"a": torch.randn(10, 3).to(dtype), "b": torch.randn(7)}
    save_file(tensors, tmp_path / "model.safetensors")
    files = sharded_load.weight_files(tmp_path)
    assert files == dict.fromkeys(tensors, tmp_path / "model.safetensors")
    header = sharded_load.read_header(tmp_path / "model.safetensors")
    for key, whole in tensors.items():
        chunks = torch.chunk(whole, world)
        parts = []
        for rank in range(world):
            start, stop = sharded_load.local_rows(whole, rank, world)
            out = torch.empty(stop - start, *whole.shape[1:], dtype=torch.float64)
            sharded_load.read_rows(files[key], header, key, whole.shape, start, out, whole.dtype)
            if rank < len(chunks):
                assert torch.equal(out, chunks[rank].double())
            parts.append(out)
        assert torch.equal(torch.cat(parts), whole.double())


def fsdp_config(model, method=None, *overrides):
    return load_config(
        None,
        ["train.strategy=fsdp", *overrides],
        model={"name_or_path": str(model)},
        method=method or {"name": "full"},
        data={"train": "unused.jsonl"},
    )


def test_which_sources_are_read_shard_by_shard(llama_dir, tmp_path, monkeypatch):
    """A safetensors model folder is read rank by rank, and so is a hub id already in the local
    Hugging Face cache (its snapshot folder; nothing is downloaded); every other source, and the
    method options that need the whole loaded weights, give the reason of the whole load."""
    import huggingface_hub

    from tunelab.training.sharded_load import fallback_reason, model_folder

    assert fallback_reason(fsdp_config(llama_dir)) is None
    snapshot = tmp_path / "hub" / "models--tiny--llama" / "snapshots" / "abc123"
    shutil.copytree(llama_dir, snapshot)
    (tmp_path / "hub" / "models--tiny--llama" / "refs").mkdir()
    (tmp_path / "hub" / "models--tiny--llama" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert model_folder("tiny/llama") == snapshot
    assert fallback_reason(fsdp_config("tiny/llama")) is None
    assert "nor in the local Hugging Face cache" in fallback_reason(fsdp_config("tiny/absent"))
    bin_dir = tmp_path / "bin"
    shutil.copytree(llama_dir, bin_dir)
    (bin_dir / "model.safetensors").unlink()
    assert ".bin weights" in fallback_reason(fsdp_config(bin_dir))
    assert ".gguf" in fallback_reason(fsdp_config(tmp_path / "model.gguf"))
    assert "4 bits" in fallback_reason(fsdp_config(llama_dir, {"name": "lora"}, "model.quantization.bits=4"))
    assert "remote code" in fallback_reason(fsdp_config(llama_dir, None, "model.trust_remote_code=true"))
    prefix = {"name": "prefix", "init_text": "Answer briefly"}
    assert "init_text" in fallback_reason(fsdp_config(llama_dir, prefix))
    adapter = {"name": "adapter", "train_layer_norms": True}
    assert "train_layer_norms" in fallback_reason(fsdp_config(llama_dir, adapter))

"""What a long real run meets: fp16 loss scaling, non-finite steps, preemption by a signal, failed
writes, devices that do not exist, and an evaluation that fails after training."""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import tunelab
from tests.helpers import sft_config
from tunelab.errors import Preempted, TunelabError
from tunelab.objectives import sft
from tunelab.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from tunelab.training.loop import accumulated_step, apply_gradients
from tunelab.training.optim import build_optimizer
from tunelab.training.setup import save_final, setup_run

LORA = {"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"}


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- fp16 and loss scaling


def lora_gradients(config, scale_loss: float, scaled: bool) -> dict[str, torch.Tensor]:
    """The LoRA gradients of one micro-batch's loss times `scale_loss`, after the backward pass and
    (with `scaled`) the loss scaler's unscaling; the optimizer does not step."""
    run = setup_run(config)
    if not scaled:
        run.scaler = None
    optimizer = build_optimizer(run.model, config.train)
    (batch,) = next(sft.sft_batches(run, load_examples(run), position=0))
    with run.autocast():
        loss, _ = sft.sft_loss(run, batch.tensors)
    run.backward(loss * scale_loss)
    if run.scaler is not None:
        run.scaler.unscale_(optimizer)
    return {n: p.grad.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}


def load_examples(run):
    from tunelab.data.dataset import prepare_data

    return prepare_data(run.config.data, run.tokenizer, seed=0).train.examples


def test_fp16_loss_scaling_keeps_gradients_that_underflow_without_it(llama_dir, instruction_data, tmp_path):
    """A loss whose gradients sit below float16's smallest subnormal (6e-8): in fp16 autocast
    without scaling most of them flush to zero; the loss scaler (S = 65536 at first) keeps them,
    and after unscaling they equal fp32's to float16's precision."""
    tiny = 2.0**-22  # brings the LoRA gradients to ~1e-8: under float16's subnormals, over them x S
    base = sft_config(llama_dir, instruction_data[0], tmp_path / "g", method=LORA)
    fp16 = sft_config(llama_dir, instruction_data[0], tmp_path / "h", "train.precision=fp16", method=LORA)
    reference = lora_gradients(base, tiny, scaled=False)
    kept = lora_gradients(fp16, tiny, scaled=True)
    lost = lora_gradients(fp16, tiny, scaled=False)
    zero_fraction = sum(int((g == 0).sum()) for g in lost.values()) / sum(g.numel() for g in lost.values())
    ref_zero = sum(int((g == 0).sum()) for g in reference.values()) / sum(
        g.numel() for g in reference.values()
    )
    assert zero_fraction > ref_zero + 0.3  # without scaling, float16 loses most gradients
    for name, g in reference.items():
        assert torch.allclose(kept[name], g, rtol=0.05, atol=g.abs().max().item() * 0.02), name


def test_fp16_training_follows_fp32(llama_dir, instruction_data, tmp_path):
    """fp16 autocast with loss scaling trains like fp32: per-step losses within 2% (float16's
    rounding of the forward), the scaler's state kept in checkpoints."""
    common = ["train.max_steps=6", "train.save_every=3", "train.lr=1e-3"]
    tunelab.train(sft_config(llama_dir, instruction_data[0], tmp_path / "fp32", *common, method=LORA))
    tunelab.train(
        sft_config(
            llama_dir, instruction_data[0], tmp_path / "fp16", *common, "train.precision=fp16", method=LORA
        )
    )
    fp32 = [r["loss"] for r in metrics(tmp_path / "fp32")]
    fp16 = [r["loss"] for r in metrics(tmp_path / "fp16")]
    assert fp16 == pytest.approx(fp32, rel=0.02)
    assert fp16[-1] < fp16[0]
    state = json.loads((tmp_path / "fp16" / "checkpoints" / "step-3" / "state.json").read_text())
    assert state["grad_scaler"]["scale"] > 0


# ---------------------------------------------------------------- non-finite steps


def poison_loss(monkeypatch, steps: set[int], value: float) -> None:
    """Make the SFT loss `value` (inf or NaN) in the optimizer steps `steps` (grad_accum 1)."""
    calls = {"n": 0}
    original = sft.sft_loss

    def loss(run, tensors):
        calls["n"] += 1
        total, extras = original(run, tensors)
        return (total * value if calls["n"] in steps else total), extras

    monkeypatch.setattr(sft, "sft_loss", loss)


def test_an_inf_step_is_skipped_not_applied(llama_dir, instruction_data, monkeypatch, tmp_path):
    poison_loss(monkeypatch, {3}, math.inf)
    config = sft_config(
        llama_dir,
        instruction_data[0],
        tmp_path / "r",
        "train.save_every=1",
        "train.keep_last=10",
        method=LORA,
    )
    tunelab.train(config)
    rows = metrics(tmp_path / "r")
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 1, 1]
    assert math.isinf(rows[2]["loss"]) and all(math.isfinite(r["loss"]) for r in rows[3:])
    weights = [
        load_file(tmp_path / "r" / "checkpoints" / f"step-{k}" / "trainable.safetensors") for k in (2, 3, 4)
    ]
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])  # step 3 not applied
    assert not all(torch.equal(weights[1][n], weights[2][n]) for n in weights[1])  # step 4 was


def test_nan_steps_in_a_row_stop_the_run_and_keep_the_checkpoint(
    llama_dir, instruction_data, monkeypatch, tmp_path
):
    poison_loss(monkeypatch, set(range(3, 100)), math.nan)
    config = sft_config(
        llama_dir,
        instruction_data[0],
        tmp_path / "r",
        "train.max_steps=20",
        "train.save_every=2",
        "train.max_nonfinite_steps=2",
        method=LORA,
    )
    with pytest.raises(TunelabError, match=r"steps 3-5 were not finite.*examples.*step-4"):
        tunelab.train(config)
    assert [r["step"] for r in metrics(tmp_path / "r")] == [1, 2, 3, 4, 5]
    # The checkpoint of step 2 (before the first NaN) and that of step 4 (a step not applied) hold
    # the same weights, and both load.
    good = load_file(tmp_path / "r" / "checkpoints" / "step-2" / "trainable.safetensors")
    later = load_file(tmp_path / "r" / "checkpoints" / "step-4" / "trainable.safetensors")
    assert all(torch.equal(good[n], later[n]) for n in good)


def test_a_gradient_that_is_not_finite_is_not_applied(llama_dir, instruction_data, tmp_path):
    run = setup_run(sft_config(llama_dir, instruction_data[0], tmp_path / "r", method=LORA))
    optimizer = build_optimizer(run.model, run.config.train)
    before = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    for p in run.model.parameters():
        if p.requires_grad:
            p.grad = torch.full_like(p, math.nan)
    norm, applied = apply_gradients(run, optimizer)
    assert math.isnan(norm) and not applied
    assert all(torch.equal(p, before[n]) for n, p in run.model.named_parameters() if p.requires_grad)
    assert all(p.grad is None for p in run.model.parameters())
    (batch,) = next(sft.sft_batches(run, load_examples(run), position=0))
    figures = accumulated_step(run, optimizer, [batch], lambda tensors: sft.sft_loss(run, tensors))
    assert figures["skipped"] == 0 and "skipped_examples" not in figures


# ---------------------------------------------------------------- preemption


def write_config(path: Path, config) -> Path:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return path


def test_sigterm_writes_a_checkpoint_and_resume_is_exact(llama_dir, instruction_data, tmp_path):
    """A real SIGTERM to a `tunelab train` process: it ends the step it is in, writes a checkpoint,
    exits with status 75; `--resume` then logs the losses of a run that never stopped."""
    common = ["train.schedule=constant", "train.warmup_steps=0", "train.lr=1e-3", "train.log_every=1"]
    long_run = sft_config(llama_dir, instruction_data[0], tmp_path / "cut", "train.max_steps=400", *common)
    path = write_config(tmp_path / "cut.yaml", long_run)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "tunelab", "train", str(path)], env=env, stderr=subprocess.PIPE, text=True
    )
    log = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == Preempted.EXIT_STATUS, stderr
    assert "SIGTERM" in stderr and "--resume" in stderr and "Traceback" not in stderr
    stopped = metrics(tmp_path / "cut")[-1]["step"]
    assert latest_checkpoint(tmp_path / "cut").name == f"step-{stopped}"

    end = stopped + 3
    resumed = subprocess.run(
        [sys.executable, "-m", "tunelab", "train", str(path), f"train.max_steps={end}", "--resume"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    tunelab.train(
        sft_config(llama_dir, instruction_data[0], tmp_path / "straight", f"train.max_steps={end}", *common)
    )
    cut = [r["loss"] for r in metrics(tmp_path / "cut")]
    straight = [r["loss"] for r in metrics(tmp_path / "straight")]
    assert len(cut) == end and cut == pytest.approx(straight, rel=1e-6)


# ---------------------------------------------------------------- failed writes


@contextlib.contextmanager
def file_size_limit(size: int):
    """Limit file writes of this process to `size` bytes, SIGXFSZ ignored so that a write past it
    fails with EFBIG instead of killing the process. The limit covers the `with` body only: it is
    process-wide, so it must be lifted before pytest writes its report (CI sends that to a file)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_a_failed_checkpoint_write_keeps_the_previous_one(llama_dir, instruction_data, tmp_path):
    run = setup_run(sft_config(llama_dir, instruction_data[0], tmp_path / "r"))  # full: large files
    optimizer = build_optimizer(run.model, run.config.train)
    save_checkpoint(run.output_dir, 2, run.model, optimizer, 2, run.config_yaml, keep_last=2)
    with file_size_limit(4096), pytest.raises(TunelabError) as error:
        save_checkpoint(run.output_dir, 4, run.model, optimizer, 4, run.config_yaml, keep_last=2)
    message = str(error.value)
    assert "step-4" in message and "File too large" in message and "step-2" in message and "\n" not in message
    checkpoints = sorted(p.name for p in (run.output_dir / "checkpoints").iterdir())
    assert checkpoints == ["step-2"]
    assert load_checkpoint(run.output_dir / "checkpoints" / "step-2", run.model, optimizer)["step"] == 2


def test_a_failed_final_write_keeps_the_earlier_final(llama_dir, instruction_data, tmp_path):
    run = setup_run(sft_config(llama_dir, instruction_data[0], tmp_path / "r"))
    first = save_final(run)
    before = sorted(p.name for p in first.iterdir())
    failure = r"could not write the final model .*final.*File too large"
    with file_size_limit(4096), pytest.raises(TunelabError, match=failure):
        save_final(run)
    assert sorted(p.name for p in first.iterdir()) == before
    assert not (tmp_path / "r" / "final.tmp").exists()


# ---------------------------------------------------------------- devices and evaluation


def test_a_device_that_is_not_there_is_one_line(llama_dir, instruction_data, tmp_path, capsys):
    from tunelab.cli import main

    path = write_config(tmp_path / "c.yaml", sft_config(llama_dir, instruction_data[0], tmp_path / "r"))
    for device in ("cuda", "cuda:7", "tpu9"):
        assert main(["train", str(path), f"model.device={device}"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "model.device" in err and "Traceback" not in err


def test_final_is_written_before_the_evaluation_that_fails(
    llama_dir, instruction_data, monkeypatch, tmp_path
):
    def broken(*args, **kwargs):
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(sft, "held_out_exact_match", broken)
    config = sft_config(
        llama_dir, instruction_data[0], tmp_path / "r", eval_file=instruction_data[1], method=LORA
    )
    with pytest.raises(RuntimeError, match="evaluation broke"):
        tunelab.train(config)
    assert (tmp_path / "r" / "final" / "adapter_model.safetensors").is_file()


def test_out_of_memory_is_one_line_with_advice(llama_dir, instruction_data, monkeypatch, tmp_path, capsys):
    from tunelab.cli import main

    def exhausted(run, tensors):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nGPU 0 has 1 GiB free.")

    monkeypatch.setattr(sft, "sft_loss", exhausted)
    path = write_config(tmp_path / "c.yaml", sft_config(llama_dir, instruction_data[0], tmp_path / "r"))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "out of memory" in err and "train.batch_size" in err and "2.00 GiB" in err


def test_a_tokenizer_without_eos_is_refused(llama_dir, tmp_path):
    import shutil

    from tunelab.models import load_tokenizer

    folder = tmp_path / "no-eos"
    shutil.copytree(llama_dir, folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["eos_token"] = None
    config_path.write_text(json.dumps(config))
    special = folder / "special_tokens_map.json"
    if special.exists():
        tokens = json.loads(special.read_text())
        tokens.pop("eos_token", None)
        special.write_text(json.dumps(tokens))
    with pytest.raises(TunelabError, match="no end-of-sequence token"):
        load_tokenizer(str(folder))


@pytest.mark.parametrize("objective", ["sft", "dpo", "grpo"])
def test_bad_data_fails_before_the_model_loads(llama_dir, tmp_path, monkeypatch, objective):
    """A bad record must not wait for a large model's load: the data are read and checked first."""
    from tunelab import trained
    from tunelab.config import load_config
    from tunelab.errors import DataError

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data were checked")

    monkeypatch.setattr(trained, "load_model", no_model)  # every run loads its model through it
    bad = tmp_path / "bad.jsonl"
    good = {
        "sft": '{"instruction": "a", "output": "b"}',
        "dpo": '{"prompt": "a", "chosen": "b", "rejected": "c"}',
    }
    bad.write_text(good.get(objective, '{"prompt": "a"}') + "\n{not json\n")
    objectives = {
        "sft": {"name": "sft"},
        "dpo": {"name": "dpo"},
        "grpo": {"name": "grpo", "reward_functions": ["tunelab.rl.rewards:short_and_ended"]},
    }
    config = load_config(
        None,
        [],
        model={"name_or_path": str(llama_dir)},
        objective=objectives[objective],
        data={"train": str(bad), "template": "alpaca"},
        train={"progress": False},
        output_dir=str(tmp_path / "r"),
    )
    with pytest.raises(DataError, match="record 2"):
        tunelab.train(config)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_weight_files_get_the_umask_of_the_other_files(llama_dir, instruction_data, tmp_path, umask):
    """safetensors writes 0600 files whatever the umask; checkpoints, `final/` (a LoRA adapter and a
    full model) and a merged model have weight files as readable as their JSON files."""
    from tunelab.merging import merge_adapter

    expected = 0o666 & ~umask
    previous = os.umask(umask)
    try:
        folders = []
        for name, method in (("lora", {"name": "lora", "r": 4}), ("full", {"name": "full"})):
            run = tmp_path / name
            tunelab.train(
                sft_config(
                    llama_dir,
                    instruction_data[0],
                    run,
                    "train.max_steps=2",
                    "train.save_every=1",
                    method=method,
                )
            )
            folders += [run / "final", latest_checkpoint(run)]
        folders.append(merge_adapter(tmp_path / "lora", tmp_path / "merged"))
    finally:
        os.umask(previous)
    for folder in folders:
        weights = sorted(folder.rglob("*.safetensors"))
        assert weights, folder
        for path in [*weights, *folder.glob("*.json")]:
            assert path.stat().st_mode & 0o777 == expected, path

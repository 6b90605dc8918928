"""End to end: the `tunelab` command line as a user runs it, each command a subprocess
(`python -m tunelab ...`), a few steps on tiny models and data, runs chained through their folders.
SFT and packing use the shipped demo model (models/demo-base, 1M parameters, whose greedy answers
are words, so comparing answers means something) on 96 records of data/demo; reward, PPO and the
bad-data check use the tiny random Llama of tests/conftest.py on data/rlhf.

- `train` (SFT, LoRA) writes the run folder of the README's contract;
- SFT -> `merge` -> `eval`: the merged model's eval loss and greedy answers are the adapter run's,
  and `generate --prompt` answers what `eval` generated for the same record;
- SFT -> merge -> DPO from the merged folder (the reference policy is the SFT model);
- reward -> PPO against that reward run -> `score` on the reward run;
- a packed run, then batched left-padded generation (`eval --batch-size 8`) = one prompt at a time;
- `--resume` of a run stopped after a checkpoint = the run that never stopped;
- a malformed JSON line: exit 2, one line on stderr naming the file and the line.

The SFT run and its merge are module-scoped fixtures shared by the tests that chain from them.
Losses of separate processes are compared at rel 1e-5 (the in-process recipe tests use 1e-6).
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from tests.helpers import PINNED_MODEL, PINNED_TRAIN

ROOT = Path(__file__).resolve().parents[2]
DEMO_MODEL = ROOT / "models" / "demo-base"  # shipped, pre-trained: its greedy answers are words, not EOS
DEMO_TRAIN = ROOT / "data" / "demo" / "train.jsonl"
DEMO_EVAL = ROOT / "data" / "demo" / "eval.jsonl"
PAIRS = ROOT / "data" / "rlhf" / "preference_train.jsonl"
HELD_OUT_PAIRS = ROOT / "data" / "rlhf" / "preference_eval.jsonl"
PROMPTS = ROOT / "data" / "rlhf" / "prompts_train.jsonl"
HELD_OUT_PROMPTS = ROOT / "data" / "rlhf" / "prompts_eval.jsonl"
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
}
LORA = {"name": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear"}
MAX_NEW_TOKENS = 8
QUIET = {"progress": False, "seed": 0}


def tunelab(*args, expect: int = 0) -> subprocess.CompletedProcess:
    """Run `python -m tunelab ARGS` as a user would; check its exit code."""
    result = subprocess.run(
        [sys.executable, "-m", "tunelab", *(str(a) for a in args)],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == expect, (
        f"tunelab {' '.join(str(a) for a in args)} exited {result.returncode}\n"
        f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-5000:]}"
    )
    return result


def write_config(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def head(source: Path, out: Path, lines: int) -> Path:
    """The first `lines` records of a JSONL file."""
    out.write_text("".join(source.read_text().splitlines(keepends=True)[:lines]))
    return out


def metrics(run_dir: Path) -> list[dict]:
    """Every line of `metrics.jsonl`, each parsed as JSON (a line that is not JSON fails)."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def eval_output(stdout: str) -> tuple[dict, list[str]]:
    """`tunelab eval --show N`: (the result JSON, the generated texts shown)."""
    generated = [ast.literal_eval(m) for m in re.findall(r"^    generated: (.*)$", stdout, re.M)]
    return json.loads(stdout[stdout.index('{\n  "path"') :]), generated


# ------------------------------------------------------------------ shared runs


@pytest.fixture(scope="module")
def demo_eval(tmp_path_factory) -> Path:
    """The first 24 held-out records of the bundled demo data."""
    return head(DEMO_EVAL, tmp_path_factory.mktemp("demo-data") / "eval.jsonl", 24)


def demo_data(eval_file: Path, **extra) -> dict:
    """A `data:` section: 96 records of the bundled demo data, the alpaca template, 64 tokens."""
    return {
        "train": str(DEMO_TRAIN),
        "eval": str(eval_file),
        "template": "alpaca",
        "max_length": 64,
        "max_records": 96,
        **extra,
    }


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, demo_eval):
    """`tunelab train` of a 6-step LoRA SFT run of the demo model, checkpoints every 2 steps:
    (config file, run folder, the finished process). float32 and fp32 pinned: `tunelab eval` (float32,
    no autocast) must measure what the run measured; packing is left to its default (on)."""
    root = tmp_path_factory.mktemp("sft")
    config = write_config(
        root / "sft.yaml",
        model={"name_or_path": str(DEMO_MODEL), **PINNED_MODEL},
        method=LORA,
        data=demo_data(demo_eval),
        train={
            "max_steps": 6,
            "batch_size": 8,
            "lr": 3e-3,
            "save_every": 2,
            "eval_every": 3,
            **PINNED_TRAIN,
            **QUIET,
        },
        eval={"max_new_tokens": MAX_NEW_TOKENS, "num_examples": 8, "batch_size": 8},
        output_dir=str(root / "run"),
    )
    return config, root / "run", tunelab("train", config)


@pytest.fixture(scope="module")
def merged(sft_run, tmp_path_factory):
    """`tunelab merge` of the SFT run: the merged model's folder."""
    out = tmp_path_factory.mktemp("merged") / "model"
    result = tunelab("merge", sft_run[1], "--out", out)
    assert str(out) in result.stdout
    return out


# ------------------------------------------------------------------ train, merge, eval, generate


def test_train_writes_the_run_folder_contract(sft_run):
    config, run_dir, result = sft_run
    assert "[tunelab] method lora" in result.stdout and "Traceback" not in result.stderr
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["method"]["name"] == "lora" and saved["method"]["r"] == 8
    assert saved["train"]["max_steps"] == 6 and saved["output_dir"] == str(run_dir)
    assert saved["train"]["lr"] == 3e-3 and saved["data"]["template"] == "alpaca"

    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for row in rows:
        assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"} <= set(row)
        assert math.isfinite(row["loss"]) and row["loss"] > 0 and row["tokens"] > 0
    assert [r["step"] for r in rows if "eval_loss" in r] == [3, 6]
    assert rows[0]["lr"] > rows[-1]["lr"]  # cosine decay

    # save_every=2: checkpoints at 2 and 4 (none at the last step: final/ is that), each complete
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-2", "step-4"]
    for step in (2, 4):
        folder = run_dir / "checkpoints" / f"step-{step}"
        state = json.loads((folder / "state.json").read_text())
        assert state["step"] == step and state["data_position"] == step
        assert {"trainable.safetensors", "optimizer.safetensors", "rng.safetensors"} <= {
            p.name for p in folder.iterdir()
        }

    final = run_dir / "final"
    adapter_config = json.loads((final / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 8
    assert adapter_config["base_model_name_or_path"] == str(DEMO_MODEL)
    weights = load_file(final / "adapter_model.safetensors")
    b_weights = [w for name, w in weights.items() if "lora_B" in name]
    assert b_weights and any("lora_A" in name for name in weights)
    assert all(name.startswith("base_model.model.") for name in weights)  # PEFT's key names
    assert max(float(w.abs().max()) for w in b_weights) > 0  # B starts at zero: it trained
    assert (final / "tokenizer_config.json").is_file() and not (final / "config.json").exists()

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["final_dir"] == str(final)
    assert summary["final_train_loss"] == pytest.approx(rows[-1]["loss"], rel=1e-9)
    assert summary["eval_loss"] == pytest.approx(rows[-1]["eval_loss"], rel=1e-6)
    assert 0 <= summary["exact_match"] <= 1
    assert (run_dir / "loss.png").stat().st_size > 0


def test_merge_then_eval_equals_the_adapter_run_and_generate_agrees(sft_run, merged, demo_eval, capsys):
    from tunelab.cli import main

    _, run_dir, _ = sft_run
    eval_file = demo_eval
    assert (merged / "config.json").is_file() and (merged / "model.safetensors").is_file()
    assert not (merged / "adapter_config.json").exists()
    # The run folder knows its eval data (24 records), template and max length; a merged folder is a
    # plain model, so the user names them.
    show = ["--max-new-tokens", MAX_NEW_TOKENS, "--show", "24", "--batch-size", "8"]
    run_eval, run_answers = eval_output(tunelab("eval", run_dir, *show).stdout)
    merged_eval, merged_answers = eval_output(
        tunelab(
            "eval", merged, "--data", eval_file, "--template", "alpaca", "--max-length", "64", *show
        ).stdout
    )
    assert run_eval["method"] == "lora" and merged_eval["method"] == "full"
    assert run_eval["records"] == merged_eval["records"] == 24
    assert merged_eval["eval_loss"] == pytest.approx(run_eval["eval_loss"], rel=1e-5)
    assert merged_answers == run_answers and len(run_answers) == 24
    assert merged_eval["exact_match"] == run_eval["exact_match"]

    # `eval` on the run measures what training measured at its end, and the adapter moved the
    # model: the loss is not the base model's.
    summary = json.loads((run_dir / "summary.json").read_text())
    assert run_eval["eval_loss"] == pytest.approx(summary["eval_loss"], rel=1e-5)
    capsys.readouterr()
    base = ["eval", str(DEMO_MODEL), "--data", str(eval_file), "--template", "alpaca", "--max-length", "64"]
    assert main([*base, "--no-generate"]) == 0  # in-process: the same code, no second start-up
    base_eval, _ = eval_output(capsys.readouterr().out)
    assert base_eval["records"] == 24 and abs(base_eval["eval_loss"] - run_eval["eval_loss"]) > 1e-3

    # `generate --prompt` on the merged model answers a record as `eval` did in a batch of 8.
    assert sum(bool(a.strip()) for a in run_answers) >= 12  # the demo model answers in words
    index = max(range(24), key=lambda i: len(run_answers[i]))
    record = json.loads(eval_file.read_text().splitlines()[index])
    answer = tunelab(
        "generate",
        merged,
        "--prompt",
        record["instruction"],
        "--input",
        record.get("input", ""),
        "--template",
        "alpaca",
        "--max-new-tokens",
        MAX_NEW_TOKENS,
    )
    assert answer.stdout.strip() == run_answers[index].strip() != ""


def test_dpo_from_the_merged_sft_model(merged, tmp_path):
    out = tmp_path / "dpo"
    config = write_config(
        tmp_path / "dpo.yaml",
        model={"name_or_path": str(merged)},
        method=LORA,
        objective={"name": "dpo", "beta": 0.1},
        data={
            "train": str(PAIRS),
            "eval": str(head(HELD_OUT_PAIRS, tmp_path / "pairs_eval.jsonl", 16)),
            "template": "alpaca",
            "max_length": 64,
            "max_records": 32,
        },
        train={"max_steps": 3, "batch_size": 8, "lr": 1e-2, **QUIET},
        output_dir=str(out),
    )
    result = tunelab("train", config)
    assert "reference policy" in result.stdout
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    keys = {"loss", "reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy"}
    assert all(keys <= set(r) for r in rows)
    # Step 1: the policy is its reference (LoRA's B = 0), so every implicit reward is 0, loss = log 2.
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert rows[0]["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_loss_before"] == pytest.approx(math.log(2), abs=1e-5)
    assert summary["eval_margin_before"] == pytest.approx(0.0, abs=1e-5)
    assert summary["eval_margin"] != pytest.approx(0.0, abs=1e-4)  # the policy moved
    adapter_config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(merged)


# ------------------------------------------------------------------ reward -> ppo -> score


@pytest.mark.slow
def test_reward_then_ppo_then_score(llama_dir, tmp_path):
    """Marked slow: three commands (about 15 s on 2 cores)."""
    pairs_eval = head(HELD_OUT_PAIRS, tmp_path / "pairs_eval.jsonl", 16)
    reward_dir = tmp_path / "reward"
    reward_config = write_config(
        tmp_path / "reward.yaml",
        model={"name_or_path": str(llama_dir)},
        objective={"name": "reward"},
        data={
            "train": str(PAIRS),
            "eval": str(pairs_eval),
            "template": "alpaca",
            "max_length": 64,
            "max_records": 48,
        },
        train={"max_steps": 3, "batch_size": 8, "lr": 1e-3, **QUIET},
        output_dir=str(reward_dir),
    )
    tunelab("train", reward_config)
    reward_summary = json.loads((reward_dir / "summary.json").read_text())
    assert {"reward_head.safetensors", "reward_model.json", "config.json"} <= {
        p.name for p in (reward_dir / "final").iterdir()
    }
    assert [r["step"] for r in metrics(reward_dir)] == [1, 2, 3]

    ppo_dir = tmp_path / "ppo"
    ppo_config = write_config(
        tmp_path / "ppo.yaml",
        model={"name_or_path": str(llama_dir)},
        objective={
            "name": "ppo",
            "reward_model": str(reward_dir),
            "max_new_tokens": MAX_NEW_TOKENS,
            "ppo_epochs": 2,
        },
        data={
            "train": str(PROMPTS),
            "eval": str(head(HELD_OUT_PROMPTS, tmp_path / "prompts_eval.jsonl", 4)),
            "template": "alpaca",
            "max_length": 64,
            "max_records": 16,
        },
        train={"max_steps": 2, "batch_size": 4, "lr": 1e-3, "schedule": "constant", **QUIET},
        eval={"num_examples": 4, "batch_size": 4},
        output_dir=str(ppo_dir),
    )
    tunelab("train", ppo_config)
    rows = metrics(ppo_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:  # the reward model alone scores: the logged reward is its score
        assert row["reward"] == pytest.approx(row["reward/model"], abs=1e-6)
        assert math.isfinite(row["loss"]) and math.isfinite(row["value_loss"])
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the first rollouts come from pi_ref itself
    ppo_summary = json.loads((ppo_dir / "summary.json").read_text())
    assert math.isfinite(ppo_summary["eval_reward_before"]) and (ppo_dir / "final" / "config.json").is_file()

    # `tunelab score` on the reward run reproduces the run's held-out figures, one JSON line a pair.
    # (--max-length: `score` does not take the run's data.max_length; its default is 2048)
    scored_lines = tunelab("score", reward_dir, "--data", pairs_eval, "--max-length", "64").stdout
    lines = scored_lines.strip().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 17 and [r["record"] for r in records[:16]] == list(range(1, 17))
    assert all(set(r) == {"record", "chosen", "rejected"} for r in records[:16])
    scored = records[-1]["summary"]
    assert scored["pairs"] == 16
    assert scored["accuracy"] == pytest.approx(reward_summary["eval_accuracy"], abs=1e-9)
    assert scored["mean_margin"] == pytest.approx(reward_summary["eval_margin"], rel=1e-4, abs=1e-5)


# ------------------------------------------------------------------ packing, then batched generation


def test_batched_left_padded_generation_after_a_packed_run(demo_eval, tmp_path, capsys):
    """A packed full fine-tuning run (final/ is a whole model, saved while packed attention was on),
    then `eval` with 8 prompts of different lengths a batch (left-padded) gives the answers of one
    prompt at a time (the in-process CLI, same code), and the loss the run measured at its end
    (with packed attention still on, on padded batches)."""
    from transformers import AutoTokenizer

    from tunelab.cli import main

    out = tmp_path / "packed"
    config = write_config(
        tmp_path / "packed.yaml",
        model={"name_or_path": str(DEMO_MODEL), **PINNED_MODEL},  # `eval` in float32 measures the run's loss
        data=demo_data(demo_eval, packing=True),
        train={"max_steps": 3, "batch_size": 8, "lr": 2e-3, **PINNED_TRAIN, **QUIET},
        eval={"max_new_tokens": MAX_NEW_TOKENS, "num_examples": 8, "batch_size": 8},
        output_dir=str(out),
    )
    assert "packing: one padding-free row" in tunelab("train", config).stdout
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    records = [json.loads(line) for line in demo_eval.read_text().splitlines()[:8]]
    lengths = {len(tokenizer(r["instruction"] + r.get("input", ""))["input_ids"]) for r in records}
    assert len(lengths) > 2  # the batch is left-padded

    show = ["--max-new-tokens", MAX_NEW_TOKENS, "--show", "24", "--device", "cpu"]
    batched, batched_answers = eval_output(tunelab("eval", out, *show, "--batch-size", "8").stdout)
    capsys.readouterr()
    assert main(["eval", str(out), *map(str, show), "--batch-size", "1"]) == 0
    single, single_answers = eval_output(capsys.readouterr().out)
    assert len(batched_answers) == 24 and sum(bool(a.strip()) for a in batched_answers) >= 12
    assert batched_answers == single_answers
    assert batched["exact_match"] == single["exact_match"]
    assert batched["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    assert batched["records"] == 24 and batched["eval_loss"] == pytest.approx(summary["eval_loss"], rel=1e-5)


# ------------------------------------------------------------------ resume


def test_resume_after_a_stop_equals_the_run_that_never_stopped(sft_run, tmp_path):
    """The SFT run's folder as a run killed during step 6 leaves it (checkpoints at 2 and 4,
    metrics up to step 5, no final/), then `tunelab train CONFIG --resume`: steps 5 and 6 are the
    uninterrupted run's, and its final adapter too."""
    config, straight_dir, _ = sft_run
    cut = tmp_path / "cut"
    shutil.copytree(straight_dir, cut, ignore=shutil.ignore_patterns("final", "summary.json", "loss.png"))
    straight = metrics(straight_dir)
    kept = [{**row, "before_the_stop": True} for row in straight[:5]]  # marks what the resume must keep
    (cut / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))

    result = tunelab("train", config, f"output_dir={cut}", "--resume")
    assert f"resumed from {cut / 'checkpoints' / 'step-4'} (step 4)" in result.stdout
    resumed = metrics(cut)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert all(r.get("before_the_stop") for r in resumed[:4])  # rows up to the checkpoint kept
    assert not any(r.get("before_the_stop") for r in resumed[4:])  # step 5 redone
    for mine, theirs in zip(resumed[4:], straight[4:], strict=True):
        for key in ("loss", "grad_norm", "lr", "tokens"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5), (key, resumed, straight)
    assert resumed[5]["eval_loss"] == pytest.approx(straight[5]["eval_loss"], rel=1e-5)
    mine = load_file(cut / "final" / "adapter_model.safetensors")
    theirs = load_file(straight_dir / "final" / "adapter_model.safetensors")
    assert mine.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert (mine[name] - tensor).abs().max() <= 1e-5 * max(1.0, float(tensor.abs().max())), name


@pytest.mark.slow
def test_resume_with_more_steps_continues_a_finished_run(llama_dir, instruction_data, tmp_path):
    """Marked slow: three runs. A finished 4-step run, then `--resume train.max_steps=6`: the steps
    after the checkpoint it resumes from are those of a 6-step run (constant schedule, so the
    learning rate does not depend on max_steps)."""
    train_file = instruction_data[0]
    config = write_config(
        tmp_path / "run.yaml",
        model={"name_or_path": str(llama_dir)},
        method=LORA,
        data={"train": str(train_file), "template": "alpaca", "max_length": 64},
        train={"max_steps": 6, "batch_size": 8, "lr": 3e-3, "schedule": "constant", "save_every": 2, **QUIET},
        output_dir=str(tmp_path / "straight"),
    )
    tunelab("train", config)
    tunelab("train", config, "train.max_steps=4", f"output_dir={tmp_path / 'grown'}")
    result = tunelab("train", config, f"output_dir={tmp_path / 'grown'}", "--resume")
    found = re.search(r"resumed from .*step-(\d+) \(step (\d+)\)", result.stdout)
    assert found, result.stdout
    start = int(found.group(2))
    straight, grown = metrics(tmp_path / "straight"), metrics(tmp_path / "grown")
    assert [r["step"] for r in grown] == [1, 2, 3, 4, 5, 6] and 2 <= start < 6
    for mine, theirs in zip(grown, straight, strict=True):  # before the stop too: the same steps
        for key in ("loss", "grad_norm", "lr"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5), (key, grown, straight)


# ------------------------------------------------------------------ bad data


def test_malformed_json_line_is_one_line_on_stderr(llama_dir, instruction_data, tmp_path):
    lines = instruction_data[0].read_text().splitlines(keepends=True)[:6]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(lines[:2]) + '{"instruction": "say hi", "output": "hi"\n' + "".join(lines[2:]))
    out = tmp_path / "run"
    config = write_config(
        tmp_path / "run.yaml",
        model={"name_or_path": str(llama_dir)},
        data={"train": str(bad), "template": "alpaca"},
        train={"max_steps": 2, **QUIET},
        output_dir=str(out),
    )
    result = tunelab("train", config, expect=2)
    stderr_lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(stderr_lines) == 1, result.stderr
    assert stderr_lines[0].startswith(f"tunelab train: error: {bad}, record 3: not valid JSON")
    assert "Traceback" not in result.stdout + result.stderr
    assert not (out / "metrics.jsonl").exists() and not (out / "final").exists()

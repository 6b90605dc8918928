"""The `checkpoint`, `long` and `eval-set` surfaces: corrupted checkpoints for --resume, records
longer than max_length, evaluation sets that end up empty."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import yaml

from tests.fuzz.corpus.adapters import (
    _cut,
    _edit_json,
    _remove,
    _replace_file,
)
from tests.fuzz.corpus.common import (
    Case,
    Invocation,
    Workspace,
    earlier_run,
    garbage,
    run_config,
    write,
    write_config,
)
from tests.fuzz.corpus.data import (
    FORMATS,
    _chat,
    _empty_parquet,
    to_jsonl,
)

# ---------------------------------------------------------------- checkpoints for --resume


def resumable(ws: Workspace, overrides: tuple[str, ...] = ()) -> tuple[Path, list[str]]:
    """A copy of the LoRA run (checkpoints step-1 and step-2) and the `train ... --resume` argv."""
    run = ws.root / "run"
    shutil.copytree(ws.runs["lora"], run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["output_dir"] = str(run)
    cfg = write(ws.path("resume.yaml"), yaml.safe_dump(config, sort_keys=False))
    return run, ["train", str(cfg), *overrides, "--resume"]


def _state(change: Callable[[dict], None]) -> Callable[[Path], None]:
    return _edit_json("state.json", change)


# name -> (mutation of the latest checkpoint step-2, the file the error must name ("" = the
# checkpoint folder), overrides of the resumed run)
CHECKPOINT_MUTATIONS: dict[str, tuple[Callable[[Path], None], str, tuple[str, ...]]] = {
    "trainable_truncated": (_cut("trainable.safetensors", lambda n: n // 2), "trainable.safetensors", ()),
    "trainable_empty": (_replace_file("trainable.safetensors", b""), "trainable.safetensors", ()),
    "trainable_garbage": (_replace_file("trainable.safetensors", garbage(512)), "trainable.safetensors", ()),
    "trainable_missing": (_remove("trainable.safetensors"), "trainable.safetensors", ()),
    "optimizer_truncated": (_cut("optimizer.safetensors", lambda n: n // 2), "optimizer.safetensors", ()),
    "optimizer_missing": (_remove("optimizer.safetensors"), "optimizer.safetensors", ()),
    "optimizer_json_garbage": (_replace_file("optimizer.json", b"{not json"), "optimizer.json", ()),
    "optimizer_json_missing": (_remove("optimizer.json"), "optimizer.json", ()),
    "rng_truncated": (_cut("rng.safetensors", lambda n: n // 2), "rng.safetensors", ()),
    "state_missing": (_remove("state.json"), "state.json", ()),
    "state_garbage": (_replace_file("state.json", b"\x00\xff garbage"), "state.json", ()),
    "state_not_an_object": (_replace_file("state.json", b"[]"), "state.json", ()),
    "state_without_step": (_state(lambda s: s.pop("step")), "state.json", ()),
    "state_step_not_an_integer": (_state(lambda s: s.__setitem__("step", "two")), "state.json", ()),
    "empty_folder": (lambda c: [p.unlink() for p in c.iterdir()], "", ()),
    "other_method_options": (lambda c: None, "trainable.safetensors", ("method.r=8",)),
    "other_method": (lambda c: None, "trainable.safetensors", ("method={name: full}",)),
}


def checkpoint_cases() -> list[Case]:
    def make(mutate, named: str, overrides: tuple[str, ...]) -> Callable[[Workspace], Invocation]:
        def build(ws: Workspace) -> Invocation:
            run, argv = resumable(ws, overrides)
            checkpoint = run / "checkpoints" / "step-2"
            mutate(checkpoint)
            return Invocation(argv, (str(checkpoint / named) if named else str(checkpoint),), (run,))

        return build

    cases = [Case("checkpoint", f"{name}@train", make(*spec)) for name, spec in CHECKPOINT_MUTATIONS.items()]

    def leftover_tmp(ws: Workspace) -> Invocation:
        """An unfinished `step-3.tmp/` (a crash mid-write) is not a checkpoint: resume from step-2."""
        run, argv = resumable(ws)
        write(run / "checkpoints" / "step-3.tmp" / "trainable.safetensors", garbage(100))
        return Invocation(argv, accepted=True, says=(r"resumed from .*step-2",))

    return cases + [Case("checkpoint", "leftover_tmp_folder@train", leftover_tmp)]


# ---------------------------------------------------------------- records longer than max_length

LONG = " ".join(["red owl sun blue fox"] * 60)  # a few hundred tokens


def long_case(name: str, records: list, fmt: str, max_length: int, says: tuple[str, ...], **extra) -> Case:
    """A training run on `records` with `data.max_length`; accepted unless `says` is empty."""

    def build(ws: Workspace) -> Invocation:
        data = write(ws.path("data", "train.jsonl"), to_jsonl(records))
        objective = FORMATS[fmt].objective
        sections = {
            "data": {"format": fmt, "max_length": max_length, "template": "plain", **extra.get("data", {})}
        }
        config = run_config(ws, data, ws.root / "out", objective=objective, **sections)
        cfg = write_config(ws, config)
        if not says:
            return Invocation(["train", str(cfg)], (str(data),), (data, cfg))
        return Invocation(["train", str(cfg)], guarded=(data,), accepted=True, says=says)

    return Case("long", f"{name}@train", build)


def long_cases() -> list[Case]:
    short = FORMATS["instruction"].valid()
    long_output = {"instruction": "Repeat the text.", "output": LONG}
    long_prompt = {"instruction": LONG, "output": "red"}
    pair = {"prompt": "Repeat.", "chosen": LONG, "rejected": "red"}
    cases = [
        long_case(
            "sft_responses_truncated",
            short + [long_output] * 2,
            "instruction",
            32,
            (r"data: truncated 2 of 5 training examples to 32 tokens",),
        ),
        long_case(
            "sft_prompt_fills_max_length",
            short + [long_prompt],
            "instruction",
            32,
            (r"data: dropped 1 training examples with no response tokens",),
        ),
        long_case("sft_every_record_too_long", [long_prompt] * 3, "instruction", 32, ()),
        long_case(
            "sft_one_huge_record",
            short + [{"instruction": "Repeat.", "output": "red owl " * 50_000}],
            "instruction",
            32,
            (r"data: truncated 1 of 4 training examples",),
        ),
        long_case(
            "chat_truncated",
            FORMATS["chat"].valid() + [_chat("Repeat.", LONG)],
            "chat",
            32,
            (r"data: truncated 1 of 4",),
        ),
        long_case(
            "text_truncated",
            FORMATS["text"].valid() + [{"text": LONG}],
            "text",
            32,
            (r"data: truncated 1 of 4",),
        ),
        long_case(
            "pairs_truncated",
            FORMATS["preference"].valid() + [pair],
            "preference",
            32,
            (r"data: truncated 1 of 4 training pairs",),
        ),
        long_case(
            "pairs_response_cut_away",
            FORMATS["preference"].valid() + [{**pair, "prompt": LONG}],
            "preference",
            32,
            (r"data: dropped 1 training pairs",),
        ),
        long_case(
            "prompts_too_long",
            FORMATS["prompt"].valid() + [{"prompt": LONG}],
            "prompt",
            32,
            (r"data: dropped 1 training prompts longer than",),
        ),
    ]

    def eval_truncates(ws: Workspace) -> Invocation:
        data = write(ws.path("data", "eval.jsonl"), to_jsonl(short + [long_output]))
        argv = ["eval", str(ws.model), "--data", str(data), "--max-length", "32", "--no-generate"]
        return Invocation(argv, guarded=(data,), accepted=True, says=(r"truncat",))

    def held_out_truncated(ws: Workspace) -> Invocation:
        train = write(ws.path("data", "train.jsonl"), to_jsonl(short))
        held_out = write(ws.path("data", "eval.jsonl"), to_jsonl(short + [long_output]))
        data = {"eval": str(held_out), "max_length": 32, "template": "plain"}
        cfg = write_config(ws, run_config(ws, train, ws.root / "out", data=data))
        return Invocation(["train", str(cfg)], accepted=True, says=(r"truncated .*eval|eval.*truncated",))

    return cases + [
        Case("long", "eval_command_truncates@eval", eval_truncates),
        Case("long", "held_out_examples_truncated@train", held_out_truncated),
    ]


# ---------------------------------------------------------------- evaluation sets that end up empty


def eval_set_cases() -> list[Case]:
    train_records = FORMATS["instruction"].valid()

    def held_out(name: str, content: bytes, suffix: str = ".jsonl", fmt: str = "instruction", **data) -> Case:
        def build(ws: Workspace) -> Invocation:
            train = write(ws.path("data", "train.jsonl"), to_jsonl(FORMATS[fmt].valid()))
            evaluation = write(ws.path("data", f"eval{suffix}"), content)
            out = earlier_run(ws.root / "earlier-run")
            sections = {"eval": str(evaluation), "format": fmt, "template": "plain", **data}
            config = run_config(ws, train, out, objective=FORMATS[fmt].objective, data=sections)
            cfg = write_config(ws, config)
            return Invocation(["train", str(cfg)], (str(evaluation),), (out, train, evaluation))

        return Case("eval-set", f"{name}@train", build)

    def fraction_takes_all(ws: Workspace) -> Invocation:
        train = write(ws.path("data", "train.jsonl"), to_jsonl(train_records[:1]))
        out = earlier_run(ws.root / "earlier-run")
        cfg = write_config(ws, run_config(ws, train, out, data={"eval_fraction": 0.5}))
        return Invocation(["train", str(cfg)], (str(train), "eval_fraction"), (out, train))

    def eval_command(name: str, content: bytes, *args: str) -> Case:
        def build(ws: Workspace) -> Invocation:
            data = write(ws.path("data", "eval.jsonl"), content)
            argv = ["eval", str(ws.model), "--data", str(data), "--no-generate", *args]
            return Invocation(argv, (str(data),), (data,))

        return Case("eval-set", name, build)

    def run_without_eval_data(ws: Workspace) -> Invocation:
        run = ws.root / "run"
        shutil.copytree(ws.runs["lora"], run)
        return Invocation(["eval", str(run)], (str(run),), (run,))

    too_long = to_jsonl([{"instruction": LONG, "output": "red"}])
    return [
        held_out("held_out_empty_file", b""),
        held_out("held_out_whitespace_only", b"\n \n"),
        held_out("held_out_csv_header_only", b"instruction,input,output\n", ".csv"),
        held_out("held_out_parquet_no_rows", _empty_parquet(), ".parquet"),
        held_out("held_out_all_bad_skipped", b'{"question": "a"}\n', skip_bad_records=True),
        held_out("held_out_all_too_long", too_long, max_length=32),
        held_out("held_out_pairs_empty_file", b"", fmt="preference"),
        held_out("held_out_prompts_empty_file", b"", fmt="prompt"),
        Case("eval-set", "eval_fraction_takes_every_record@train", fraction_takes_all),
        eval_command("eval_command_empty_file@eval", b""),
        eval_command("eval_command_limit_zero@eval", to_jsonl(train_records), "--limit", "0"),
        eval_command("eval_command_all_too_long@eval", too_long, "--max-length", "16"),
        Case("eval-set", "run_without_eval_data@eval", run_without_eval_data),
    ]

"""The command line: help for every command, one-line errors without tracebacks, eval/generate on a run."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

import tunelab
from tests.helpers import run_in_process, sft_config
from tunelab.cli import COMMANDS, main


def run_cli(*args, stdin: str | None = None, cwd=None):
    """`python -m tunelab ARGS` in a new process: for what only a process shows (its exit, what
    it imports); the rest runs `main` in this process (`tests.helpers.run_in_process`)."""
    return subprocess.run(
        [sys.executable, "-m", "tunelab", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=300,
        cwd=cwd,
    )


def test_python_m_tunelab_help_lists_every_command():
    result = run_cli("--help")
    assert result.returncode == 0
    for name in COMMANDS:
        assert name in result.stdout


def test_building_the_parser_imports_neither_torch_nor_transformers():
    """`tunelab --help` answers at once: no command's options need torch or transformers (importing
    them took 8 s on a slow machine). The dtype names the options offer are the loader's."""
    probe = (
        "import sys; from tunelab.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    from tunelab.commands.arguments import DTYPE_NAMES
    from tunelab.models import DTYPES

    assert DTYPE_NAMES == tuple(DTYPES)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: tunelab " + command in capsys.readouterr().out


def test_bad_config_key_is_one_line_without_traceback(tmp_path):
    """Through a real process: exit status 2 and nothing but the line on stderr."""
    config = tmp_path / "bad.yaml"
    config.write_text("model: {name_or_path: x}\ntrain: {learning_rate: 1}\n")
    result = run_cli("train", str(config))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "unknown key 'train.learning_rate'" in result.stderr and str(config) in result.stderr


def test_missing_model_path_is_a_clear_error(tmp_path, instruction_data, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {{name_or_path: {tmp_path}/no-such-model}}\ndata: {{train: {instruction_data[0]}}}\n"
    )
    result = run_in_process(["train", config], capsys)
    assert result.code == 2 and "Traceback" not in result.err
    assert "does not exist" in result.err


def test_bad_data_record_is_a_clear_error(tmp_path, llama_dir, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": 5}\n')
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {{name_or_path: {llama_dir}}}\ndata: {{train: {data}}}\noutput_dir: {tmp_path}/out\n"
    )
    result = run_in_process(["train", config], capsys)
    assert result.code == 2 and "Traceback" not in result.err
    assert f"{data}, record 2, field 'output': expected a string" in result.err


def test_eval_and_generate_on_a_trained_run(tiny_model_dirs, instruction_data, tmp_path, capsys, monkeypatch):
    """`eval`, `generate --prompt` and `generate` reading lines from stdin, on a run's folder
    (tests/e2e/test_cli_chains.py runs them as processes)."""
    train_file, eval_file = instruction_data
    run_dir = tmp_path / "run"
    tunelab.train(
        sft_config(tiny_model_dirs["llama"], train_file, run_dir, "train.max_steps=3", eval_file=eval_file)
    )
    result = run_in_process(["eval", run_dir, "--limit", "6", "--max-new-tokens", "4"], capsys)
    assert result.code == 0, result.err
    metrics = json.loads(result.out[result.out.index("{") :])
    assert metrics["records"] == 6 and metrics["eval_loss"] > 0 and 0 <= metrics["exact_match"] <= 1
    answer = run_in_process(
        ["generate", run_dir, "--prompt", "What is 2 plus 2?", "--max-new-tokens", "4"], capsys
    )
    assert answer.code == 0, answer.err
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nagain\n\n"))
    chat = run_in_process(["generate", run_dir, "--max-new-tokens", "3"], capsys)
    assert chat.code == 0, chat.err
    assert chat.out.count("\n") == 2  # one reply line per user line (a barely trained model may say nothing)


def test_demo_runs_from_any_working_directory(tmp_path, capsys, monkeypatch):
    """The bundled config, data and model are found from elsewhere; the run goes under the working
    directory."""
    quick = ["train.max_steps=2", "train.eval_every=0", "train.save_every=0", "eval.num_examples=4"]
    monkeypatch.chdir(tmp_path)
    result = run_in_process(["demo", *quick, "output_dir=out"], capsys)
    assert result.code == 0, result.err
    assert "| exact match (held-out)" in result.out and str(tmp_path / "out") in result.out
    summary = json.loads((tmp_path / "out" / "demo.json").read_text())
    assert summary["after"]["steps"] == 2 and (tmp_path / "out" / "final").is_dir()


def test_train_options_may_follow_the_overrides():
    from tunelab.cli import build_parser, parse_args

    parser = build_parser()
    for argv in (
        ["train", "run.yaml", "--resume", "method.r=8", "train.lr=1"],
        ["train", "run.yaml", "method.r=8", "train.lr=1", "--resume"],
        ["train", "run.yaml", "method.r=8", "--resume", "train.lr=1"],
    ):
        args = parse_args(parser, argv)
        assert (args.command, args.config, args.resume) == ("train", "run.yaml", True)
        assert args.overrides == ["method.r=8", "train.lr=1"]


def test_the_command_exits_as_a_normal_exit_would_less_the_teardown():
    """`exit_now`: the exit status, a non-daemon thread waited for, the atexit functions run and
    unflushed output written, as `sys.exit` would; then `os._exit`."""
    code = (
        "import atexit, threading, time\n"
        "from tunelab.cli import exit_now\n"
        "atexit.register(lambda: print('atexit ran', end=''))\n"
        "threading.Thread(target=lambda: (time.sleep(0.3), print('thread done'))).start()\n"
        "print('unflushed ', end='')\n"
        "exit_now(3)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 3
    assert result.stdout == "unflushed thread done\natexit ran"

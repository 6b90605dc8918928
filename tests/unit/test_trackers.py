"""Experiment trackers (`train.report_to`, tunelab/trackers.py): one tiny SFT run reports to
TensorBoard, W&B (offline), MLflow (a local file store) and Trackio (its local database), and each
is read back with the tool's own reader and compared with `metrics.jsonl`, `samples.jsonl` and
the run's `config.yaml`."""

from __future__ import annotations

import json
import os
import sqlite3
import struct
import time
from pathlib import Path

import pytest
import yaml

import tunelab
from tests.helpers import sft_config
from tunelab.cli import main
from tunelab.trackers import flatten, samples_table
from tunelab.training.metrics import MetricsLog, read_metrics, read_samples

PROMPTS = ["What is 2 plus 3?", "Reverse the words: red owl sun"]


def wandb_records(run_file: Path):
    """The protobuf records of a W&B `.wandb` file. Its format is LevelDB's log: a 7-byte header
    (`:W&B`, magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each `<crc32 u32, length u16,
    type u8>` + data, type 1 a whole record, 2/3/4 its first/middle/last piece; fewer than 7 bytes
    left in a block are padding."""
    from wandb.proto import wandb_internal_pb2

    raw = run_file.read_bytes()
    assert raw[:4] == b":W&B"
    pos, pending, block = 7, b"", 32768
    while pos + 7 <= len(raw):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        data, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def read_wandb(root: Path) -> tuple[dict, dict, Path]:
    """(step -> history row, config, the run's files folder) of the one offline run under `root`."""
    (run_file,) = root.glob("wandb/offline-run-*/run-*.wandb")
    history, config = {}, {}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            history.setdefault(row["_step"], {}).update(row)
        elif kind in ("run", "config"):
            updates = record.run.config.update if kind == "run" else record.config.update
            config.update({item.key: json.loads(item.value_json) for item in updates})
    config.pop("_wandb", None)
    return history, config, run_file.parent / "files"


def figures(row: dict) -> dict:
    """A metrics.jsonl row's numbers (what each tracker gets), without the step."""
    return {k: v for k, v in row.items() if k != "step" and isinstance(v, int | float)}


@pytest.fixture
def tracker_env(tmp_path, monkeypatch):
    """Every tracker local and offline, under `tmp_path`."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3's file store asks for this
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # read when trackio is first imported
    return tmp_path


def test_every_tracker_holds_the_figures_of_metrics_jsonl(llama_dir, instruction_data, tracker_env):
    """Every number of every metrics.jsonl row is in each tracker at the row's step, the flattened
    config is each run's parameters, and the samples of each evaluation reach W&B, MLflow and
    Trackio as tables or text."""
    train_file, eval_file = instruction_data
    out = tracker_env / f"run-{os.getpid()}-{time.time_ns()}"  # the tracker run's name: unique
    overrides = [
        "train.max_steps=4",
        "train.lr=3e-4",  # the model still says something: the samples are not empty
        "train.eval_every=2",
        "eval.max_new_tokens=4",
        f"eval.sample_prompts={PROMPTS}",
    ]
    report_to = "train.report_to=[tensorboard, wandb, mlflow, trackio]"
    tunelab.train(sft_config(llama_dir, train_file, out, *overrides, report_to, eval_file=eval_file))
    expected = {row["step"]: figures(row) for row in read_metrics(out)}
    assert sorted(expected) == [1, 2, 3, 4] and "eval_loss" in expected[4]
    params = flatten(yaml.safe_load((out / "config.yaml").read_text()))
    assert params["train.report_to"] == '["tensorboard", "wandb", "mlflow", "trackio"]'
    samples = {step: [s for s in read_samples(out) if s["step"] == step] for step in (2, 4)}
    assert [len(rows) for rows in samples.values()] == [2, 2]
    assert all(s["completion"] for rows in samples.values() for s in rows)

    # W&B: the history rows and the config in the offline run file; a table file per evaluation.
    history, config, files = read_wandb(tracker_env)
    assert config == params
    assert sorted(history) == [1, 2, 3, 4]
    for step, row in history.items():
        assert {k: v for k, v in row.items() if not k.startswith(("_", "samples"))} == expected[step]
    for step, rows in samples.items():
        table = json.loads((files / history[step]["samples/path"]).read_text())
        assert table["data"] == [[step, s["prompt"], s["completion"]] for s in rows]

    # MLflow: the run in the file store, through MlflowClient.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])
    assert run.info.run_name == out.name and run.info.status == "FINISHED"
    assert run.data.params == {key: str(value) for key, value in params.items()}
    logged: dict = {}
    for key in run.data.metrics:
        for point in client.get_metric_history(run.info.run_id, key):
            logged.setdefault(point.step, {})[key] = point.value
    assert logged == expected
    for step, rows in samples.items():
        text = Path(
            client.download_artifacts(run.info.run_id, f"samples/step-{step}.jsonl", str(tracker_env))
        ).read_text()
        assert [json.loads(line) for line in text.splitlines()] == rows

    # Trackio: its local SQLite database (one per project).
    import trackio.utils

    database = sqlite3.connect(trackio.utils.TRACKIO_DIR / "tunelab.db")
    stored = database.execute("SELECT step, metrics FROM metrics WHERE run_name = ?", (out.name,)).fetchall()
    numbers, tables = {}, {}
    for step, text in stored:
        row = json.loads(text)
        if "samples" in row:
            tables[step] = row["samples"]["_value"]
        else:
            numbers.setdefault(step, {}).update(row)
    assert numbers == expected
    assert tables == {step: rows for step, rows in samples.items()}
    ((config_text,),) = database.execute(
        "SELECT config FROM configs WHERE run_name = ?", (out.name,)
    ).fetchall()
    assert {k: v for k, v in json.loads(config_text).items() if not k.startswith("_")} == params

    # TensorBoard: the scalars through its own event reader (float32 there).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars: dict = {}
    for key in events.Tags()["scalars"]:
        for event in events.Scalars(key):
            scalars.setdefault(event.step, {})[key] = event.value
    assert sorted(scalars) == sorted(expected)
    for step, row in expected.items():
        assert scalars[step] == pytest.approx(row, rel=1e-6)
    texts = {
        event.step: event.tensor_proto.string_val[0].decode()
        for event in events.Tensors("samples/text_summary")
    }
    assert texts == {step: samples_table(rows) for step, rows in samples.items()}
    assert all(s["prompt"] in texts[s["step"]] for rows in samples.values() for s in rows)


def test_a_missing_tracker_package_stops_the_run_before_anything_loads(
    llama_dir, instruction_data, tmp_path, monkeypatch, capsys
):
    """`train.report_to: [wandb]` without wandb: `tunelab train` exits 2 with one line naming the
    key and the pip command, before the run folder exists (so before any data or model loads)."""
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # what importlib finds when wandb is not installed
    config = tmp_path / "run.yaml"
    sections = {
        "model": {"name_or_path": str(llama_dir)},
        "data": {"train": str(instruction_data[0])},
        "train": {"report_to": ["wandb"]},
        "output_dir": str(tmp_path / "run"),
    }
    config.write_text(yaml.safe_dump(sections))
    assert main(["train", str(config)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "train.report_to: wandb is not installed: pip install wandb" in error
    assert not (tmp_path / "run").exists()
    assert main(["train", str(config), "train.report_to=[comet]"]) == 2
    assert "train.report_to" in capsys.readouterr().err


def test_only_an_enabled_log_reports(tracker_env):
    """The log of a process that is not the main one (`enabled=False`) starts no tracker run and
    writes nothing; the main process's log starts one."""
    from mlflow.tracking import MlflowClient

    config = {"train": {"report_to": ["mlflow"]}, "output_dir": "x"}
    (tracker_env / "quiet").mkdir()
    quiet = MetricsLog(tracker_env / "quiet", enabled=False, config=config)
    quiet.log({"step": 1, "loss": 1.0})
    quiet.close()
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    assert client.get_experiment_by_name("tunelab") is None
    assert list((tracker_env / "quiet").iterdir()) == []
    (tracker_env / "main").mkdir()
    log = MetricsLog(tracker_env / "main", enabled=True, config=config)
    log.log({"step": 1, "loss": 1.0})
    log.close()
    (run,) = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])
    assert run.data.metrics == {"loss": 1.0} and run.data.params == {
        "train.report_to": '["mlflow"]',
        "output_dir": "x",
    }


def test_a_tracker_that_cannot_start_is_one_line(tracker_env, monkeypatch):
    """A tracking URI MLflow has no store for: a one-line TunelabError naming the tracker and the cause."""
    from tunelab.errors import TunelabError

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchstore://tracking")
    config = {"train": {"report_to": ["tensorboard", "mlflow"]}}
    with pytest.raises(
        TunelabError, match=r"^train.report_to: mlflow could not start a run: .*nosuchstore"
    ) as error:
        MetricsLog(tracker_env, enabled=True, config=config)
    assert "\n" not in str(error.value)


def test_a_tracker_that_fails_mid_run_is_left_out(tracker_env, capsys):
    """MLflow refusing a row (its run deleted under it) does not stop training: one note, the tracker
    gets nothing more, and metrics.jsonl keeps every row."""
    from mlflow.tracking import MlflowClient

    log = MetricsLog(tracker_env, enabled=True, config={"train": {"report_to": ["mlflow"]}})
    log.log({"step": 1, "loss": 2.0})
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])
    client.delete_run(run.info.run_id)
    log.log({"step": 2, "loss": 1.5})
    log.log({"step": 3, "loss": 1.0})
    log.close()
    assert [row["loss"] for row in read_metrics(tracker_env)] == [2.0, 1.5, 1.0]
    notes = [line for line in capsys.readouterr().out.splitlines() if "mlflow failed" in line]
    assert len(notes) == 1 and "at step 2" in notes[0]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1]

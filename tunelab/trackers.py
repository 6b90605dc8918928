"""Experiment trackers (`train.report_to`): TensorBoard, Weights & Biases, MLflow, Trackio.

Every tracker has the same small interface, used by `tunelab.training.metrics.MetricsLog`:

    log_params(params)             the resolved config, flattened (`{"train.lr": 0.0002, ...}`), once
    log_metrics(step, figures)     the numbers of one `metrics.jsonl` row, at its step
    log_samples(step, samples)     the `eval.sample_prompts` answers of one evaluation, as text
    finish()                       close the tracker's run

What reaches `metrics.jsonl` reaches every tracker, with the same step. Only the main process of a
distributed run logs (MetricsLog is only enabled there). The packages are optional: a tracker that
is named but not installed stops the run when its config is read (`check_installed`), before any
data or model is loaded. Where the data go is each tool's own setting, read from its environment:

| tracker | where | project / experiment |
|---|---|---|
| tensorboard | `OUTPUT_DIR/tensorboard/` | - |
| wandb | wandb's (`WANDB_MODE=offline`, `WANDB_DIR`; `wandb login` for online) | `WANDB_PROJECT`, else `tunelab` |
| mlflow | `MLFLOW_TRACKING_URI`: a server, or `file:./mlruns` with `MLFLOW_ALLOW_FILE_STORE=true` (MLflow's default `sqlite:` store needs the full `mlflow`, not `mlflow-skinny`) | `MLFLOW_EXPERIMENT_NAME`, else `tunelab` |
| trackio | trackio's local database (`TRACKIO_DIR`), or a Space (`TRACKIO_SPACE_ID`) | `tunelab` |

The tracker's run is named after the output folder. A resumed run (`train.resume`) starts a new
tracker run with the steps from the checkpoint on; `metrics.jsonl` holds the whole history.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

from tunelab.errors import ConfigError, TunelabError, one_line

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
"""The names `train.report_to` accepts."""

PACKAGES = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "wandb": ("wandb", "pip install wandb"),
    "mlflow": ("mlflow", "pip install mlflow-skinny (or mlflow)"),
    "trackio": ("trackio", "pip install trackio"),
}
"""Tracker -> (the module it imports, how to install it)."""

PROJECT = "tunelab"
"""The project (W&B, Trackio) or experiment (MLflow) when the tool's environment names none."""

MAX_PARAM_CHARS = 6000
"""MLflow refuses longer parameter values (a chat template given inline); longer ones are cut."""


def installed(name: str) -> bool:
    """Whether tracker `name`'s package can be imported."""
    return importlib.util.find_spec(PACKAGES[name][0]) is not None


def check_installed(names: list[str]) -> None:
    """A one-line `ConfigError` naming the first tracker of `names` whose package is missing and
    the command that installs it."""
    for name in names:
        if name not in PACKAGES:
            raise ConfigError(f"train.report_to: unknown tracker {name!r}; known: {', '.join(TRACKERS)}")
        if not installed(name):
            raise ConfigError(
                f"train.report_to: {name} is not installed: {PACKAGES[name][1]} "
                "(or pip install 'tunelab[trackers]' for all of them)"
            )


def flatten(config: dict, prefix: str = "") -> dict:
    """A nested config as `{"section.key": value}`: numbers, strings, booleans and None as they are,
    lists as JSON text (every tracker takes these)."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, list | tuple):
            flat[name] = json.dumps(value)
        else:
            flat[name] = value
    return flat


def cell(text) -> str:
    """`text` as one cell of a Markdown table."""
    return str(text).replace("|", "\\|").replace("\n", "<br>")


def samples_table(samples: list[dict]) -> str:
    """Samples as a Markdown table (prompt, completion), for trackers that show text."""
    lines = ["| prompt | completion |", "|---|---|"]
    lines += [f"| {cell(s['prompt'])} | {cell(s['completion'])} |" for s in samples]
    return "\n".join(lines)


class TensorBoard:
    """Scalars as `add_scalar(key, value, step)`; the config and the samples as text."""

    def __init__(self, output_dir: Path, name: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(output_dir / "tensorboard"))

    def log_params(self, params: dict) -> None:
        rows = "\n".join(f"| {key} | {cell(value)} |" for key, value in params.items())
        self.writer.add_text("config", f"| option | value |\n|---|---|\n{rows}", 0)

    def log_metrics(self, step: int, figures: dict) -> None:
        for key, value in figures.items():
            self.writer.add_scalar(key, value, step)

    def log_samples(self, step: int, samples: list[dict]) -> None:
        self.writer.add_text("samples", samples_table(samples), step)

    def finish(self) -> None:
        self.writer.close()


class WandB:
    """A W&B run (`wandb.init`); the config as its config, samples as a `wandb.Table`."""

    def __init__(self, output_dir: Path, name: str):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or PROJECT, name=name)

    def log_params(self, params: dict) -> None:
        self.run.config.update(params)

    def log_metrics(self, step: int, figures: dict) -> None:
        self.run.log(figures, step=step)

    def log_samples(self, step: int, samples: list[dict]) -> None:
        rows = [[step, s["prompt"], s["completion"]] for s in samples]
        self.run.log(
            {"samples": self.wandb.Table(columns=["step", "prompt", "completion"], data=rows)}, step=step
        )

    def finish(self) -> None:
        self.run.finish()


class MLflow:
    """An MLflow run through `MlflowClient` (no global active run): parameters, metrics with
    their steps, and each evaluation's samples as the artifact `samples/step-N.jsonl`."""

    def __init__(self, output_dir: Path, name: str):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or PROJECT
        experiment = self.client.get_experiment_by_name(experiment_name)
        experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(experiment_name)
        )
        self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        self.client.log_batch(
            self.run_id, params=[Param(key, str(value)[:MAX_PARAM_CHARS]) for key, value in params.items()]
        )

    def log_metrics(self, step: int, figures: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, step) for key, value in figures.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_samples(self, step: int, samples: list[dict]) -> None:
        text = "".join(json.dumps({"step": step, **s}) + "\n" for s in samples)
        self.client.log_text(self.run_id, text, f"samples/step-{step}.jsonl")

    def finish(self) -> None:
        self.client.set_terminated(self.run_id)


class Trackio:
    """A Trackio run (`trackio.init`); the config as its config, samples as a `trackio.Table`."""

    def __init__(self, output_dir: Path, name: str):
        import trackio

        self.trackio, self.name = trackio, name
        self.run = None

    def log_params(self, params: dict) -> None:
        # trackio takes the config when the run starts, so the run starts here
        self.run = self.trackio.init(project=PROJECT, name=self.name, config=params)

    def log_metrics(self, step: int, figures: dict) -> None:
        self.run.log(figures, step=step)

    def log_samples(self, step: int, samples: list[dict]) -> None:
        rows = [[step, s["prompt"], s["completion"]] for s in samples]
        self.run.log(
            {"samples": self.trackio.Table(columns=["step", "prompt", "completion"], data=rows)}, step=step
        )

    def finish(self) -> None:
        if self.run is not None:
            self.trackio.finish()  # this run's end, and trackio forgets it as its current run


CLASSES = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow, "trackio": Trackio}


def open_trackers(names: list[str], output_dir: Path, params: dict) -> dict:
    """Start a run in each tracker of `names` (the run named after `output_dir`) and log `params`
    to it. Returns {name: tracker}. A tracker that cannot start (not logged in, a tracking server
    that does not answer) is a one-line `TunelabError` naming it."""
    check_installed(names)
    trackers = {}
    for name in names:
        try:
            tracker = CLASSES[name](output_dir, Path(output_dir).resolve().name)
            tracker.log_params(params)
        except Exception as error:  # each tool has its own errors; all mean "cannot start"
            for started in trackers.values():
                started.finish()
            raise TunelabError(f"train.report_to: {name} could not start a run: {one_line(error)}") from error
        trackers[name] = tracker
    return trackers

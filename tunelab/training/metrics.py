"""Run metrics: `metrics.jsonl` (one JSON object per logged step), `samples.jsonl` (the answers to
`eval.sample_prompts` at each evaluation), the experiment trackers of `train.report_to`
(tunelab/trackers.py; TensorBoard whenever it is installed) and a loss-curve PNG at the end."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tunelab.console import note
from tunelab.errors import one_line
from tunelab.trackers import flatten, installed, open_trackers


class MetricsLog:
    """Appends rows to `OUTPUT_DIR/metrics.jsonl` and sends their numbers to the trackers; a row's
    `samples` (a list of {prompt, completion}) go to `OUTPUT_DIR/samples.jsonl` and to the trackers
    as text instead.

    `config` is the run's resolved config as a nested dict; without it, the `config.yaml` that
    `StepLoop` writes into the run folder just before it opens the log. Its `train.report_to`
    chooses the trackers, and it is logged, flattened, as the trackers' run parameters."""

    def __init__(
        self, output_dir: Path, enabled: bool = True, resume_step: int = 0, config: dict | None = None
    ):
        self.path = output_dir / "metrics.jsonl"
        self.samples_path = output_dir / "samples.jsonl"
        self.enabled = enabled
        self.trackers: dict = {}
        if not enabled:
            return
        restart(self.path, resume_step)
        restart(self.samples_path, resume_step)
        if not resume_step:
            self.path.write_text("")  # a new run's metrics.jsonl exists from its start
        if config is None and (output_dir / "config.yaml").is_file():
            config = yaml.safe_load((output_dir / "config.yaml").read_text()) or {}
        config = config or {}
        names = list((config.get("train") or {}).get("report_to") or [])
        if "tensorboard" not in names and installed("tensorboard"):
            names.insert(0, "tensorboard")  # as before report_to existed: TensorBoard whenever installed
        self.trackers = open_trackers(names, output_dir, flatten(config))

    def log(self, row: dict) -> None:
        """Write one row (must hold `step`)."""
        if not self.enabled:
            return
        row = dict(row)
        samples = row.pop("samples", None)
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        step = row["step"]
        figures = {k: v for k, v in row.items() if k != "step" and isinstance(v, int | float)}
        self._send("log_metrics", step, figures)
        if samples:
            with self.samples_path.open("a") as handle:
                for sample in samples:
                    handle.write(json.dumps({"step": step, **sample}) + "\n")
            self._send("log_samples", step, samples)

    def _send(self, method: str, step: int, payload) -> None:
        """Call `method` of every tracker. One that fails (a tracking server gone) is reported once and
        left out from then on: the run goes on, and `metrics.jsonl` keeps every row."""
        for name, tracker in list(self.trackers.items()):
            try:
                getattr(tracker, method)(step, payload)
            except Exception as error:  # each tool has its own errors
                del self.trackers[name]
                note(f"[tunelab] {name} failed at step {step} ({one_line(error)}); it gets no more figures")

    def close(self) -> None:
        for name, tracker in list(self.trackers.items()):
            try:
                tracker.finish()
            except Exception as error:  # the run's own files are complete; say what the tracker lost
                note(f"[tunelab] {name} could not finish its run ({one_line(error)})")
        self.trackers = {}


def restart(path: Path, resume_step: int) -> None:
    """A run's JSON-lines file as a run starting after `resume_step` finds it: without the rows past
    that step (resumed), or gone (a new run)."""
    if resume_step and path.exists():  # drop rows past the checkpoint we resume from
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= resume_step))
    elif not resume_step:
        path.unlink(missing_ok=True)


def read_metrics(output_dir: Path) -> list[dict]:
    """All rows of a run's `metrics.jsonl`."""
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_samples(output_dir: Path) -> list[dict]:
    """All rows of a run's `samples.jsonl` (step, prompt, completion); none when it has none."""
    path = Path(output_dir) / "samples.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(output_dir: Path, title: str = "") -> Path | None:
    """Draw training loss (and eval loss where logged) against step into `loss.png`."""
    rows = read_metrics(output_dir)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or str(output_dir))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(output_dir) / "loss.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

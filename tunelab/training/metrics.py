"""Run metrics: `metrics.jsonl` (one JSON object per logged step), TensorBoard when installed,
and a loss-curve PNG at the end."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    """Appends rows to `OUTPUT_DIR/metrics.jsonl` and mirrors scalars to TensorBoard if available."""

    def __init__(self, output_dir: Path, enabled: bool = True, resume_step: int = 0):
        self.path = output_dir / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        if resume_step and self.path.exists():  # drop rows past the checkpoint we resume from
            rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            self.path.write_text(
                "".join(json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= resume_step)
            )
        elif not resume_step:
            self.path.write_text("")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output_dir / "tensorboard"))
        except ImportError:
            self.writer = None

    def log(self, row: dict) -> None:
        """Write one row (must hold `step`)."""
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(output_dir: Path) -> list[dict]:
    """All rows of a run's `metrics.jsonl`."""
    path = Path(output_dir) / "metrics.jsonl"
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

"""Training curves as a PNG artifact: loss per step and validation recall per epoch."""

from __future__ import annotations

import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402


def log_training_curves(tracking_uri: str, run_id: str) -> None:
    client = MlflowClient(tracking_uri)
    history = lambda key: client.get_metric_history(run_id, key)  # noqa: E731
    loss = sorted((m.step, m.value) for m in history("train/loss"))
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    if loss:
        left.plot(*zip(*loss, strict=True))
    left.set(title="training loss", xlabel="step", ylabel="loss")
    for key in ("val/t2v/R1", "val/t2v/R5", "val/v2t/R1"):
        points = sorted((m.step, m.value) for m in history(key))
        if points:
            right.plot(*zip(*points, strict=True), marker="o", label=key)
    right.set(title="validation recall", xlabel="step", ylabel="%")
    right.legend(loc="lower right")
    figure.tight_layout()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "training_curves.png"
        figure.savefig(path, dpi=100)
        client.log_artifact(run_id, str(path))
    plt.close(figure)

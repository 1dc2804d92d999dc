"""Pictures MLflow keeps: a run's training curves (loss per step, validation recall per epoch) and a study's plot."""

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


def study_figure(cells: list, title: str) -> plt.Figure:
    """Test t2v R@1 against event_fraction: one panel per entity_scale, one line per head, error bars over
    seeds. `cells` are `hvd.train.study.Cell`s."""
    scales = sorted({c.entity_scale for c in cells})
    figure, axes = plt.subplots(1, len(scales), figsize=(4.5 * len(scales), 3.8), sharey=True, squeeze=False)
    for axis, scale in zip(axes[0], scales, strict=True):
        for head in sorted({c.head for c in cells}):
            points = sorted((c.event_fraction, c.mean, c.std) for c in cells if c.entity_scale == scale and c.head == head)
            x, mean, std = zip(*points, strict=True)
            axis.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=head)
        axis.set(title=f"entity_scale {scale}", xlabel="event_fraction", ylabel="test t2v R@1 (%)")
        axis.grid(alpha=0.3)
        axis.legend(loc="lower right")
    figure.suptitle(title)
    figure.tight_layout()
    return figure

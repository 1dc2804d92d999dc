"""Pictures MLflow keeps: a run's training curves (loss per step, validation recall per epoch) and a study's plots."""

from __future__ import annotations

import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
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
        for head in sorted({c.head for c in cells if c.entity_scale == scale}):  # a stopped study: not every head yet
            points = sorted((c.event_fraction, c.mean, c.std) for c in cells if c.entity_scale == scale and c.head == head)
            x, mean, std = zip(*points, strict=True)
            axis.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=head)
        axis.set(title=f"entity_scale {scale}", xlabel="event_fraction", ylabel="test t2v R@1 (%)")
        axis.grid(alpha=0.3)
        axis.legend(loc="lower right")
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def retention_figure(cells: list, retention: dict[str, tuple[float, float]], title: str) -> plt.Figure:
    """HVD's frame x patch retention (the paper's Table 4) as a grid of test t2v R@1, mean +- std over seeds.
    `retention`: each variant's (frame retention, patch retention)."""
    frames = sorted({f for f, _ in retention.values()})
    patches = sorted({p for _, p in retention.values()})
    grid = np.full((len(frames), len(patches)), np.nan)
    figure, axis = plt.subplots(figsize=(1.6 * len(patches) + 2.5, 1.2 * len(frames) + 1.8))
    for cell in cells:
        f, p = retention[cell.head]
        row, column = frames.index(f), patches.index(p)
        grid[row, column] = cell.mean
        axis.text(column, row, f"{cell.mean:.1f}\n+- {cell.std:.1f}", ha="center", va="center", fontsize=9)
    image = axis.imshow(grid, cmap="Greens")
    axis.set_xticks(range(len(patches)), [str(p) for p in patches])
    axis.set_yticks(range(len(frames)), [str(f) for f in frames])
    axis.set(xlabel="patch retention (model.hvd.pfcm_ratio)", ylabel="frame retention (model.hvd.frame_keep)")
    figure.colorbar(image, ax=axis, label="test t2v R@1 (%)")
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    return figure


MECHANISM_SHOWN = (("frame_recall", "event-frame recall"), ("frame_precision", "event-frame precision"),
                   ("event_mass", "frame mass on the event"), ("entity_purity", "target-entity purity"))


def mechanism_figure(cells: list, title: str) -> plt.Figure:
    """Where each head looked, one panel per cell: its mechanism metrics (means over seeds) as bars, chance
    (the share of sampled frames that show the event) as a dashed line."""
    keys = sorted({(c.event_fraction, c.entity_scale) for c in cells})
    heads = sorted({c.head for c in cells})
    figure, axes = plt.subplots(1, len(keys), figsize=(0.9 * len(heads) * len(keys) + 3, 4.2), sharey=True,
                                squeeze=False)
    width = 0.8 / len(MECHANISM_SHOWN)
    for axis, (ef, es) in zip(axes[0], keys, strict=True):
        by_head = {c.head: c.mechanism for c in cells if (c.event_fraction, c.entity_scale) == (ef, es)}
        for offset, (metric, label) in enumerate(MECHANISM_SHOWN):
            values = [by_head.get(head, {}).get(metric) for head in heads]
            axis.bar(np.arange(len(heads)) + (offset - 1.5) * width, [np.nan if v is None else v for v in values],
                     width, label=label)
        shares = [m["event_share"] for m in by_head.values() if m.get("event_share") is not None]
        if shares:
            axis.axhline(float(np.mean(shares)), color="grey", linestyle="--", label="chance (event share)")
        axis.set_xticks(range(len(heads)), heads, rotation=30)
        axis.set(title=f"event_fraction {ef}, entity_scale {es}", ylim=(0, 1.05))
        axis.grid(alpha=0.3, axis="y")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    figure.suptitle(title)
    figure.tight_layout(rect=(0, 0.08, 1, 1))  # the legend below every panel, never over a bar
    return figure

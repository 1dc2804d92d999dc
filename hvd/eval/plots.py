"""The evaluation report's pictures: recall@K curves, a similarity heat map, and FFSM / PFCM at work."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.ticker import ScalarFormatter  # noqa: E402
from torch import Tensor  # noqa: E402

from hvd.eval.explain import PairExplanation  # noqa: E402

KEPT_COLOUR = "#1a9850"
DPI = 100


def _save(figure: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return path


def recall_curves(ranks: dict[str, dict[str, Tensor]], num_candidates: dict[str, int], path: Path) -> Path:
    """Recall@K for K = 1 .. all candidates, one line per (mode, direction).

    ranks: mode -> {"t2v": ranks, "v2t": ranks}; num_candidates: direction -> gallery size.
    """
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, direction in zip(axes, ("t2v", "v2t"), strict=True):
        k = np.arange(1, num_candidates[direction] + 1)
        for mode, by_direction in ranks.items():
            sorted_ranks = np.sort(by_direction[direction].numpy())
            recall = np.searchsorted(sorted_ranks, k, side="right") / len(sorted_ranks) * 100
            axis.plot(k, recall, drawstyle="steps-post", label=mode)
        axis.set(title=f"{direction} recall@K", xlabel="K", ylabel="recall %", xscale="log", ylim=(0, 101))
        axis.xaxis.set_major_formatter(ScalarFormatter())
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(loc="lower right")
    figure.tight_layout()
    return _save(figure, path)


def similarity_slice(
    scores: Tensor, text_video: Tensor, title: str, path: Path, shown: Tensor | None = None, size: int = 32
) -> Path:
    """The first `size` videos against the first caption of each, so the ground truth lies on the
    diagonal. `shown` [texts, videos] bool: draw only these pairs (two-stage: the rescored ones)."""
    videos = min(size, scores.shape[1])
    first_caption = [int((text_video == v).nonzero()[0]) for v in range(videos)]
    block = scores[first_caption][:, :videos].float().numpy()
    if shown is not None:
        block = np.ma.masked_where(~shown[first_caption][:, :videos].numpy(), block)
    figure, axis = plt.subplots(figsize=(6, 5))
    image = axis.imshow(block, cmap="viridis", interpolation="nearest")
    figure.colorbar(image, ax=axis, label="score")
    axis.set(title=title, xlabel="video", ylabel="caption (of the video with the same index)")
    figure.tight_layout()
    return _save(figure, path)


def _entity_colours(count: int) -> ListedColormap:
    base = plt.get_cmap("tab10" if count <= 10 else "tab20")
    return ListedColormap([base(i % base.N) for i in range(count)])


def frame_selection(pair: PairExplanation, path: Path) -> Path:
    """Top row: every frame with its caption similarity, FFSM's kept frames framed in green, the dropped
    ones dimmed. Bottom row: the kept frames with each patch coloured by its PFCM entity (as HVD Fig. 3)."""
    frames = len(pair.frames)
    figure, axes = plt.subplots(2, frames, figsize=(1.4 * frames, 3.6), squeeze=False)
    entities = _entity_colours(int(pair.entities.max()) + 1)
    size = pair.frames.shape[1]
    for index in range(frames):
        top, bottom = axes[0, index], axes[1, index]
        kept = bool(pair.kept[index])
        top.imshow(pair.frames[index], alpha=1.0 if kept else 0.35)
        top.set_title(f"{pair.frame_scores[index]:.2f}", fontsize=8, color=KEPT_COLOUR if kept else "grey")
        if kept:
            top.add_patch(
                Rectangle((0, 0), size - 1, size - 1, fill=False, edgecolor=KEPT_COLOUR, linewidth=3)
            )
            bottom.imshow(pair.frames[index])
            bottom.imshow(
                pair.entities[index],
                cmap=entities,
                vmin=-0.5,
                vmax=entities.N - 0.5,
                alpha=0.5,
                extent=(-0.5, size - 0.5, size - 0.5, -0.5),
                interpolation="nearest",
            )
        for axis in (top, bottom):
            axis.set_xticks([])
            axis.set_yticks([])
            if axis is bottom and not kept:
                axis.axis("off")
    figure.suptitle(
        f'"{pair.caption}" -> {pair.video_id} (ground truth, ranked {pair.rank})\n'
        "top: caption-frame cosine, the frames FFSM kept framed; bottom: PFCM entities over the kept frames",
        fontsize=9,
    )
    figure.tight_layout()
    return _save(figure, path)

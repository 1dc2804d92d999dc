"""The evaluation report's pictures (recall@K curves, a similarity heat map, FFSM / PFCM at work) and a
search's contact sheet."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter  # noqa: E402
from torch import Tensor  # noqa: E402

from hvd.eval.explain import PairExplanation  # noqa: E402

KEPT_COLOUR = "#1a9850"
DPI = 100


def _save(figure: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return path


MODE_STYLES = {"exhaustive": {"linestyle": "-", "linewidth": 2.5}, "two_stage": {"linestyle": "--", "linewidth": 1.5}}
FRAMES_PER_ROW = 6


def integer_ticks(limit: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to `limit`: readable ticks on a log axis of counts."""
    ticks, scale = [], 1
    while scale <= limit:
        ticks += [t for t in (scale, 2 * scale, 5 * scale) if t <= limit]
        scale *= 10
    return ticks


def recall_figure(ranks: dict[str, dict[str, Tensor]], num_candidates: dict[str, int]) -> plt.Figure:
    """Recall@K for K = 1 .. all candidates, one line per (mode, direction); modes drawn in different
    styles, so a two-stage line lying on the exhaustive one stays visible.

    ranks: mode -> {"t2v": ranks, "v2t": ranks}; num_candidates: direction -> gallery size.
    """
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    for axis, direction in zip(axes, ("t2v", "v2t"), strict=True):
        k = np.arange(1, num_candidates[direction] + 1)
        for mode, by_direction in ranks.items():
            sorted_ranks = np.sort(by_direction[direction].numpy())
            recall = np.searchsorted(sorted_ranks, k, side="right") / len(sorted_ranks) * 100
            axis.plot(k, recall, drawstyle="steps-post", label=mode.replace("_", "-"), **MODE_STYLES.get(mode, {}))
        axis.set(title=f"{direction} recall@K", xlabel="K", ylabel="recall %", xscale="log", ylim=(0, 101))
        axis.xaxis.set_major_locator(FixedLocator(integer_ticks(num_candidates[direction])))
        axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.0f}"))
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=len(labels), frameon=False)
    return figure


def recall_curves(ranks: dict[str, dict[str, Tensor]], num_candidates: dict[str, int], path: Path) -> Path:
    return _save(recall_figure(ranks, num_candidates), path)


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


def frame_selection_figure(pair: PairExplanation) -> plt.Figure:
    """Every frame with the head's score of it, the kept (or favoured) frames framed in green and the others
    dimmed; with PFCM entities (HVD), under each kept frame its patches coloured by entity (as HVD Fig. 3),
    with the entity count; with clips (HCMI), each frame's clip in its title. Frames wrap at FRAMES_PER_ROW, so the figure keeps a readable size at any frame
    count."""
    frames = len(pair.frames)
    columns = min(frames, FRAMES_PER_ROW)
    rows = -(-frames // columns)
    tiers = 1 if pair.entities is None else 2  # a row of frames, and under it their entities if any
    figure, axes = plt.subplots(
        tiers * rows, columns, figsize=(1.6 * columns, 1.65 * tiers * rows + 0.9), squeeze=False, layout="constrained"
    )
    entity_count = 0 if pair.entities is None else int(pair.entities.max()) + 1
    colours = _entity_colours(max(entity_count, 1))
    size = pair.frames.shape[1]
    for index in range(tiers * rows * columns):
        axes.flat[index].set_axis_off()
    for index in range(frames):
        row, column = divmod(index, columns)
        top = axes[tiers * row, column]
        kept = bool(pair.kept[index])
        padding = not bool(pair.valid[index])
        top.set_axis_on()
        top.set_xticks([])
        top.set_yticks([])
        top.imshow(pair.frames[index], alpha=1.0 if kept else 0.35)
        group = "" if pair.groups is None or padding else f" (clip {pair.groups[index]})"
        label = "padding" if padding else f"frame {index}{group}: {pair.frame_scores[index]:.2f}"
        top.set_title(label, fontsize=8, color=KEPT_COLOUR if kept else "grey")
        if not kept:
            continue
        for spine in top.spines.values():
            spine.set(edgecolor=KEPT_COLOUR, linewidth=3)
        if pair.entities is None:
            continue
        bottom = axes[tiers * row + 1, column]
        bottom.imshow(pair.frames[index])
        bottom.imshow(
            pair.entities[index],
            cmap=colours,
            vmin=-0.5,
            vmax=colours.N - 0.5,
            alpha=0.5,
            extent=(-0.5, size - 0.5, size - 0.5, -0.5),
            interpolation="nearest",
        )
        present = len(np.unique(pair.entities[index][pair.entities[index] >= 0]))
        bottom.set_title(f"{present} entities", fontsize=8)
    caption = textwrap.fill(f'"{pair.caption}" -> {pair.video_id} (ground truth, ranked {pair.rank})', 90)
    legend = textwrap.fill(pair.legend + (f" ({entity_count} colours)" if entity_count else ""), 90)
    figure.suptitle(f"{caption}\n{legend}", fontsize=9)
    return figure


def frame_selection(pair: PairExplanation, path: Path) -> Path:
    return _save(frame_selection_figure(pair), path)


MECHANISM_BARS = (("frame_recall", "event-frame\nrecall"), ("frame_precision", "event-frame\nprecision"),
                  ("event_mass", "frame mass\non the event"), ("event_share", "chance\n(event share)"),
                  ("entity_purity", "target entity\npurity"))


def mechanism_figure(metrics: dict[str, float], title: str) -> plt.Figure:
    """The mechanism metrics as bars on [0, 1], chance in grey; the target's split into entities in the label."""
    found = {key.rsplit("mechanism/", 1)[1]: value for key, value in metrics.items() if "mechanism/" in key}
    shown = [(label, found[key], "#999999" if key == "event_share" else KEPT_COLOUR)
             for key, label in MECHANISM_BARS if key in found]
    figure, axis = plt.subplots(figsize=(1.4 * len(shown) + 2, 3.6))
    bars = axis.bar([label for label, _, _ in shown], [value for _, value, _ in shown],
                    color=[colour for _, _, colour in shown])
    axis.bar_label(bars, fmt="%.2f")
    axis.set_ylim(0, 1.1)
    split = f"; the target's patches fall into {found['entity_split']:.2f} entities a frame" if "entity_split" in found else ""
    axis.set_title(textwrap.fill(f"{title}: where the head looked, over {int(found.get('pairs', 0))} caption-video "
                                 f"pairs{split}", 70), fontsize=9)
    figure.tight_layout()
    return figure


def mechanism_bars(metrics: dict[str, float], title: str, path: Path) -> Path:
    return _save(mechanism_figure(metrics, title), path)


def contact_sheet_figure(query: str, pairs: list[PairExplanation], scores: list[float]) -> plt.Figure:
    """One row per search result (best first), its frames left to right: the frames the head kept for the
    query framed green, the others dimmed."""
    columns = max(len(pair.frames) for pair in pairs)
    figure, axes = plt.subplots(
        len(pairs), columns, figsize=(1.1 * columns + 1.2, 1.2 * len(pairs) + 0.8), squeeze=False, layout="constrained"
    )
    for row, (pair, score) in enumerate(zip(pairs, scores, strict=True)):
        for column in range(columns):
            ax = axes[row, column]
            ax.set_xticks([])
            ax.set_yticks([])
            if column >= len(pair.frames) or not pair.valid[column]:
                ax.set_axis_off()
                continue
            kept = bool(pair.kept[column])
            ax.imshow(pair.frames[column], alpha=1.0 if kept else 0.35)
            for spine in ax.spines.values():
                spine.set(edgecolor=KEPT_COLOUR if kept else "lightgrey", linewidth=3 if kept else 1)
        axes[row, 0].set_axis_on()
        axes[row, 0].set_ylabel(f"#{pair.rank} {pair.video_id}\n{score:.3f}", fontsize=8, rotation=0, ha="right",
                                va="center")
    title = textwrap.fill(f'"{query}": top {len(pairs)} by full-model score', 110)
    figure.suptitle(f"{title}\nframes the head kept for the caption framed green, the others dimmed", fontsize=9)
    return figure


def contact_sheet(query: str, pairs: list[PairExplanation], scores: list[float], path: Path) -> Path:
    return _save(contact_sheet_figure(query, pairs, scores), path)

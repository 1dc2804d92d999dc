"""Mechanism metrics: did a head look where the caption's event and object are?

Retrieval metrics say how often a head ranks the right video first, not why. A benchmark that records its
ground truth (the synthetic one does: `event_frames` and `target_boxes` in every shard row) lets evaluation
ask each head, for every test caption and its own video, what its score looked at (`Head.explain`):

- `frame_recall`, `frame_precision`: of the sampled frames that show the event, the share the head kept
  (FFSM's kept set; frames weighed above uniform for X-Pool and EERCF; the best clip's frames for HCMI), and
  of the kept frames, the share that show it. Mean pooling keeps every frame: recall 1, precision the
  chance level `event_share`.
- `event_mass`: the share of the head's frame pooling on event frames (X-Pool's attention, EERCF's gate;
  uniform over the kept frames for heads that select), against `event_share`, what weighing every frame
  alike gives.
- `entity_purity`, `entity_split` (heads with PFCM entities): on each event frame, the entity holding most
  of the target's patches; purity is the share of that entity's patches (in every frame it spans) that lie
  in the target's box, split the number of entities the frame's target patches are spread over.

Pairs whose sampled frames miss the event count towards `event_share` and `frame_precision` only.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from hvd.eval.encode import Tokenizer
from hvd.eval.explain import PairExplanation, can_explain, explain_row
from hvd.model import RetrievalModel

PREFIX = "mechanism/"


def frame_recall_precision(kept: np.ndarray, event: np.ndarray, valid: np.ndarray) -> tuple[float | None, float]:
    """Recall (None when no valid frame shows the event) and precision of the kept frames against the event's."""
    kept, event = kept & valid, event & valid
    hits = int((kept & event).sum())
    return (hits / int(event.sum()) if event.any() else None), hits / max(int(kept.sum()), 1)


def event_mass(weights: np.ndarray, event: np.ndarray, valid: np.ndarray) -> float:
    """The share of `weights` (one per frame) on valid event frames."""
    weights = np.where(valid, weights, 0.0)
    return float(weights[event & valid].sum() / max(weights.sum(), 1e-12))


def target_patches(box: list[float], grid: int) -> np.ndarray:
    """[grid, grid] bool: the patches at least half inside `box` ((x0, y0, x1, y1) shares of the side), and
    always the one under the box's centre, so an object smaller than a patch still has one."""
    x0, y0, x1, y1 = (float(v) * grid for v in box)
    edges = np.arange(grid, dtype=np.float64)
    overlap_x = np.clip(np.minimum(edges + 1, x1) - np.maximum(edges, x0), 0, 1)
    overlap_y = np.clip(np.minimum(edges + 1, y1) - np.maximum(edges, y0), 0, 1)
    inside = overlap_y[:, None] * overlap_x[None, :] >= 0.5
    centre_y, centre_x = min(int((y0 + y1) / 2), grid - 1), min(int((x0 + x1) / 2), grid - 1)
    inside[centre_y, centre_x] = True
    return inside


def entity_purity_split(entities: np.ndarray, target: np.ndarray) -> tuple[float, float] | None:
    """Mean over frames holding target patches of (purity, split) of the entity that holds most of them.

    entities [T, G, G]: the entity of every patch, numbered per clip (-1: not clustered); target [T, G, G]:
    the target's patches. None when no clustered patch is the target's.
    """
    purity, split = [], []
    for frame in range(len(entities)):
        ids = entities[frame][target[frame] & (entities[frame] >= 0)]
        if ids.size == 0:
            continue
        main = Counter(ids.tolist()).most_common(1)[0][0]
        members = entities == main
        purity.append(float((members & target).sum() / members.sum()))
        split.append(float(len(np.unique(ids))))
    return (statistics.fmean(purity), statistics.fmean(split)) if purity else None


def pair_mechanism(pair: PairExplanation, event: np.ndarray, boxes: list[list[float]] | None) -> dict[str, float]:
    """One pair's metrics (recall only when its frames show the event; entities only with boxes and entities)."""
    valid = pair.valid.astype(bool)
    recall, precision = frame_recall_precision(pair.kept.astype(bool), event, valid)
    found = {"frame_precision": precision, "event_mass": event_mass(pair.frame_weights, event, valid),
             "event_share": float(event[valid].mean())}
    if recall is not None:
        found["frame_recall"] = recall
    if pair.entities is not None and boxes is not None:
        grid = pair.entities.shape[-1]
        target = np.stack([target_patches(box, grid) if box else np.zeros((grid, grid), bool)
                           for box in boxes + [[]] * (len(pair.entities) - len(boxes))])
        if (entity := entity_purity_split(pair.entities, target)) is not None:
            found["entity_purity"], found["entity_split"] = entity
    return found


def mean_metrics(per_pair: Iterable[dict[str, float]]) -> dict[str, float]:
    """Each metric's mean over the pairs that have it, under `mechanism/`, with the count of pairs."""
    per_pair = list(per_pair)
    keys = sorted({key for found in per_pair for key in found})
    means = {f"{PREFIX}{key}": statistics.fmean(f[key] for f in per_pair if key in f) for key in keys}
    return means | ({f"{PREFIX}pairs": float(len(per_pair))} if per_pair else {})


def ground_truth_rows(shards: str | Path, split: str, limit: int) -> pa.Table | None:
    """Up to `limit` rows of a split that record ground truth, frames included; None when its shards have none
    (a benchmark without it, or shards of an older format), so a large split is never read whole for nothing."""
    dataset = ds.dataset(Path(shards) / split, format="parquet")
    if "event_frames" not in dataset.schema.names or limit < 1:
        return None
    table = dataset.scanner(filter=pc.is_valid(pc.field("event_frames"))).head(limit)
    return table if len(table) else None


def mechanism_metrics(model: RetrievalModel, tokenizer: Tokenizer, table: pa.Table,
                      limit: int | None = None) -> dict[str, float]:
    """The mechanism metrics of the first `limit` (default: every) videos of a split with ground truth, each
    with its first caption; empty for a head that cannot say what it looked at or a benchmark that records no
    ground truth."""
    if not can_explain(model) or "event_frames" not in table.column_names:
        return {}
    was_training = model.training
    model.eval()
    per_pair = []
    for row in table.filter(pc.is_valid(table["event_frames"])).slice(0, limit).to_pylist():
        pair = explain_row(model, tokenizer, row["captions"][0], row)
        event = np.zeros(len(pair.valid), bool)
        event[: len(row["event_frames"])] = row["event_frames"]
        per_pair.append(pair_mechanism(pair, event, row["target_boxes"]))
    model.train(was_training)
    return mean_metrics(per_pair)


def mechanism_line(metrics: dict[str, float]) -> str:
    """The mechanism metrics found in `metrics` (keys with or without a split prefix) as one summary line."""
    found = {key.rsplit(PREFIX, 1)[1]: value for key, value in metrics.items() if PREFIX in key}

    def shown(*labelled: tuple[str, str]) -> str:
        return ", ".join(f"{label} {found[key]:.2f}" for key, label in labelled if key in found)

    frames = shown(("frame_recall", "recall"), ("frame_precision", "precision"), ("event_mass", "mass"))
    chance = f" (chance {found['event_share']:.2f})" if "event_share" in found else ""
    entity = shown(("entity_purity", "purity"), ("entity_split", "split"))
    return "; ".join(part for part in (f"event frames: {frames}{chance}" if frames else "",
                                       f"target entity: {entity}" if entity else "") if part)

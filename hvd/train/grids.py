"""The study's grids: which cells, heads (or head variants) and seeds each one trains, and at what size.

Apart from `hvd.train.study`, which runs them, so that `pipelines/study.py --help` lists them without importing
Ray Tune, MLflow and torch.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from hvd.config import CHOICES

Cells = tuple[tuple[float, float], ...]  # (event_fraction, entity_scale) pairs


def sweep(event_fraction: tuple[float, ...], entity_scale: tuple[float, ...]) -> Cells:
    """Every (event_fraction, entity_scale) pair, event_fraction slowest: the cells of a full sweep."""
    return tuple(itertools.product(event_fraction, entity_scale))


@dataclass(frozen=True)
class Grid:
    cells: Cells
    head: tuple[str, ...]  # heads or `VARIANTS`
    seed: tuple[int, ...]
    overrides: tuple[str, ...] = ()  # applied to the study's config for this grid: the trial size

    @property
    def trials(self) -> list[dict[str, Any]]:
        """Every trial's knobs, in the order they run: the cell slowest, then the seed, the head fastest. A long
        study stopped early has its first cells whole (every head, every seed: a comparison within the seeds'
        spread); each seed's warm start is trained in the first cell and reused by the others."""
        return [{"event_fraction": ef, "entity_scale": es, "head": head, "seed": seed}
                for (ef, es), seed, head in itertools.product(self.cells, self.seed, self.head)]


# HVD's frame retention x patch retention (the paper's Table 4): `model.hvd.frame_keep` x `model.hvd.pfcm_ratio`.
RETENTION: dict[str, dict[str, Any]] = {
    f"hvd-f{f}-p{p}": {"head": "hvd", "hvd.frame_keep": f, "hvd.pfcm_ratio": p}
    for f in (0.25, 0.5, 0.75) for p in (0.25, 0.5, 0.75)
}
# Head variants a grid may name besides the heads themselves: a head with some of its keys set (dotted under
# `model`, as `replace_keys` takes them).
VARIANTS: dict[str, dict[str, Any]] = {
    "hcmi-no-denoising": {"head": "hcmi", "hcmi.label_denoising": False},
    "hcmi-no-enhancement": {"head": "hcmi", "hcmi.sample_enhancement": False},
    "hcmi-plain": {"head": "hcmi", "hcmi.label_denoising": False, "hcmi.sample_enhancement": False},
    **RETENTION,
    **{f"hvd-{scope}": {"head": "hvd", "hvd.pfcm_scope": scope} for scope in CHOICES["model.hvd.pfcm_scope"]},
    "hvd-above-mean": {"head": "hvd", "hvd.frame_select": "above_mean"},
    "hvd-near-best": {"head": "hvd", "hvd.frame_select": "near_best"},
}
GRIDS: dict[str, Grid] = {
    # Minutes on 2 cores; CI runs it. One cell, both heads, a tiny benchmark and warm start, one training worker
    # (the study is the subject here, not data parallelism; the smoke went from 254 s to 237 s in a fresh clone's suite).
    "smoke": Grid(((0.25, 0.15),), ("hvd", "meanp"), (0,), (
        "synthetic.preset=tiny", "train.epochs=1", "train.batch_size=8", "train.num_workers=1", "pretrain.train_stills=64",
        "pretrain.val_stills=16", "pretrain.epochs=1", "pretrain.batch_size=16",
    )),
    # About 15 minutes on 2 cores: the demo recipe at the two ends of event brevity, small entities, one seed.
    "pilot": Grid(sweep((0.15, 1.0), (0.15,)), ("hvd", "meanp"), (0,)),
    # About 2.5 hours on 2 cores (3.5-4 min a trial): the demo recipe in each cell, where the paper's claim can be tested.
    "default": Grid(sweep((0.15, 0.3, 1.0), (0.15, 0.3)), ("hvd", "meanp"), (0, 1, 2)),
    # The heads added beside HVD and meanP, in the default grid's (0.3, 0.3) cell: with that cell of `default`
    # (the same benchmark, warm starts and recipe) every head on one benchmark, 3 seeds. About 40 minutes.
    "heads": Grid(((0.3, 0.3),), ("xpool", "eercf", "hvp"), (0, 1, 2)),
    # HCMI and its two training switches in the same cell, 3 seeds: the ablation rows. About 50 minutes.
    "hcmi": Grid(((0.3, 0.3),), ("hcmi", "hcmi-no-denoising", "hcmi-no-enhancement", "hcmi-plain"), (0, 1, 2)),
    # Every head, with its mechanism metrics, where the event is brief and the entity small, brief with a larger
    # entity, and where the event fills the clip. 54 trials, about 3.5 hours on 2 cores at ~3.5-4 min a trial
    # (and a warm start per seed, about 5 min each, shared with the other grids); resumable.
    "family": Grid(((0.15, 0.15), (0.3, 0.3), (1.0, 0.3)), ("hvd", "meanp", "xpool", "eercf", "hvp", "hcmi"), (0, 1, 2)),
    # HVD's frame x patch retention where its claim is strongest, 3 seeds: 27 trials.
    "ablation": Grid(((0.15, 0.15),), tuple(RETENTION), (0, 1, 2)),
    # Does the frame retention that wins for brief events (0.25) cost HVD where the event is longer? The paper's
    # 0.5 against 0.25 (patch retention 0.5 both) in the (0.3, 0.3) and dense cells, 3 seeds: 12 trials.
    "keep": Grid(((0.3, 0.3), (1.0, 0.3)), ("hvd-f0.25-p0.5", "hvd-f0.5-p0.5"), (0, 1, 2)),
    # What HVD's PFCM clusters (each frame, the whole video, a pair's kept frames) in two cells, 3 seeds: 18 trials.
    "scopes": Grid(((0.15, 0.15), (0.3, 0.3)), ("hvd-frame", "hvd-video", "hvd-pair"), (0, 1, 2)),
    # FFSM keeping as many frames as match the caption instead of a fixed share, two rules in the family grid's
    # three cells, the two ends first, 3 seeds: 18 trials, about 1.5 hours (the family grid's `hvd` rows are the
    # paper's rule).
    "select": Grid(((0.15, 0.15), (1.0, 0.3), (0.3, 0.3)), ("hvd-above-mean", "hvd-near-best"), (0, 1, 2)),
    # A cluster's grid: the full benchmark, a finer sweep, five seeds.
    "full": Grid(sweep((0.1, 0.2, 0.3, 0.5, 0.75, 1.0), (0.1, 0.15, 0.2, 0.3, 0.4)), ("hvd", "meanp"), (0, 1, 2, 3, 4),
                 ("synthetic.preset=full",)),
}

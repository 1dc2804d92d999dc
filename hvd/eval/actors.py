"""Encode a benchmark split with Ray Data: an actor pool that loads the model once per actor.

Videos stream from the Parquet shards through `VideoEncoder` actors and captions through
`TextEncoder` actors (GPU actors when the cluster has GPUs); features come back to the driver as
tensor columns and are put in the order of `read_shards` (sorted by video_id), so the result is the
same `EncodedSplit` that the single-process `encode_split` gives.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch

from hvd.config import Config
from hvd.data.shards import open_shards, read_shards
from hvd.eval.encode import EncodedSplit, encode_rows
from hvd.model import RetrievalModel, TextFeatures, VideoFeatures, build_tokenizer, rebuild_model
from hvd.runtime.progress import Progress

VIDEO_FIELDS = VideoFeatures.field_names()


class _ModelActor:
    """Holds one model, built once from the config and the weights the driver put in the object store."""

    def __init__(self, cfg: Config, weights: list[ray.ObjectRef]):
        # A reference inside a list is passed as it is: the weights are put once and each actor fetches them.
        self.cfg = cfg
        self.model: RetrievalModel = rebuild_model(cfg.model, ray.get(weights[0]))
        if torch.cuda.is_available():
            self.model.cuda()


class VideoEncoder(_ModelActor):
    @torch.no_grad()
    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        features = encode_rows(self.model, batch.to_pylist()).to("cpu")
        columns = {name: getattr(features, name).numpy() for name in VIDEO_FIELDS}
        return {"video_id": np.asarray(batch["video_id"].to_pylist(), dtype=object), **columns}


class TextEncoder(_ModelActor):
    def __init__(self, cfg: Config, weights: list[ray.ObjectRef]):
        super().__init__(cfg, weights)
        self.tokenizer = build_tokenizer(cfg.model, cfg.data.max_words)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        features = self.model.encode_text(self.tokenizer(list(batch["caption"]))).to("cpu")
        return {
            "index": batch["index"],
            "sentence": features.sentence.numpy(),
            "words": features.words.numpy(),
            "word_mask": features.word_mask.numpy(),
        }


def actor_resources(num_actors: int) -> dict[str, Any]:
    """`map_batches` arguments for the pool: one GPU per actor when the cluster has GPUs, else 1 CPU."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    size = num_actors or max(gpus, 1)
    return {"compute": ray.data.ActorPoolStrategy(size=size), "num_gpus": 1 if gpus else 0, "num_cpus": 1}


def _collect(dataset: ray.data.Dataset, columns: tuple[str, ...], progress: Progress) -> dict[str, np.ndarray]:
    """The pool's output columns, gathered in the driver; `progress` counts rows as they come back (the actors
    themselves print nothing)."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in columns}
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for name in columns:
            parts[name].append(batch[name])
        progress.advance(len(batch[columns[0]]))
    return {name: np.concatenate(arrays) for name, arrays in parts.items()}


def _pool_arguments(model: RetrievalModel, cfg: Config, num_actors: int) -> dict[str, Any]:
    weights = [ray.put({k: v.cpu() for k, v in model.state_dict().items()})]
    return {"fn_constructor_args": (cfg, weights), "batch_size": cfg.eval.batch_size, **actor_resources(num_actors)}


def encode_videos_with_actors(
    model: RetrievalModel, cfg: Config, shards: str, split: str, num_actors: int = 0
) -> tuple[list[str], VideoFeatures]:
    """Every video of one split, encoded by an actor pool: ids and features in `read_shards` order."""
    video_ids = read_shards(shards, split, columns=["video_id"])["video_id"].to_pylist()
    videos = open_shards(shards, split).map_batches(
        VideoEncoder, batch_format="pyarrow", **_pool_arguments(model, cfg, num_actors)
    )
    columns = _collect(videos, ("video_id", *VIDEO_FIELDS), Progress(len(video_ids), f"encoding {split} videos"))
    position = {video_id: i for i, video_id in enumerate(columns["video_id"])}
    order = torch.tensor([position[video_id] for video_id in video_ids])
    return video_ids, VideoFeatures(**{name: torch.from_numpy(columns[name]) for name in VIDEO_FIELDS})[order]


def encode_texts_with_actors(model: RetrievalModel, cfg: Config, captions: list[str], num_actors: int = 0) -> TextFeatures:
    """Every caption, encoded by an actor pool, in the order given."""
    texts = ray.data.from_items([{"index": i, "caption": c} for i, c in enumerate(captions)]).map_batches(
        TextEncoder, batch_format="numpy", **_pool_arguments(model, cfg, num_actors)
    )
    columns = _collect(texts, ("index", "sentence", "words", "word_mask"), Progress(len(captions), "encoding captions"))
    order = torch.from_numpy(np.argsort(columns["index"], kind="stable"))
    text = TextFeatures(**{name: torch.from_numpy(columns[name]) for name in TextFeatures.field_names()})
    return text[order]


def encode_with_actors(
    model: RetrievalModel, cfg: Config, shards: str, split: str, num_actors: int = 0,
    videos: tuple[list[str], VideoFeatures] | None = None,
) -> EncodedSplit:
    """Every video and caption of one split, encoded by actor pools; rows in `read_shards` order.
    `videos`: the split's video ids and features, encoded before (a gallery index): only captions are encoded."""
    table = read_shards(shards, split, columns=["video_id", "captions"])
    video_ids = table["video_id"].to_pylist()
    captions = [caption for row in table["captions"].to_pylist() for caption in row]
    text_video = torch.tensor([i for i, row in enumerate(table["captions"].to_pylist()) for _ in row])
    if videos is None:
        videos = encode_videos_with_actors(model, cfg, shards, split, num_actors)
    elif videos[0] != video_ids:
        raise ValueError(f"the given video features are of other videos than the {split} split of {shards}")
    text = encode_texts_with_actors(model, cfg, captions, num_actors)
    return EncodedSplit(text, videos[1], text_video, video_ids, captions)

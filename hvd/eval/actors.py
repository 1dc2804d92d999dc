"""Encode a benchmark split with Ray Data: an actor pool that loads the model once per actor.

Videos stream from the Parquet shards through `VideoEncoder` actors and captions through
`TextEncoder` actors (GPU actors when the cluster has GPUs); features come back to the driver as
tensor columns and are put in the order of `read_shards` (sorted by video_id), so the result is the
same `EncodedSplit` that the single-process `encode_split` gives.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch

from hvd.config import Config
from hvd.data.shards import open_shards, read_shards
from hvd.eval.encode import EncodedSplit, encode_rows
from hvd.model import RetrievalModel, TextFeatures, VideoFeatures, build_tokenizer, rebuild_model

VIDEO_FIELDS = tuple(field.name for field in dataclasses.fields(VideoFeatures))


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


def _collect(dataset: ray.data.Dataset, columns: tuple[str, ...]) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {name: [] for name in columns}
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for name in columns:
            parts[name].append(batch[name])
    return {name: np.concatenate(arrays) for name, arrays in parts.items()}


def encode_with_actors(
    model: RetrievalModel, cfg: Config, shards: str, split: str, num_actors: int = 0
) -> EncodedSplit:
    """Every video and caption of one split, encoded by an actor pool; rows in `read_shards` order."""
    table = read_shards(shards, split, columns=["video_id", "captions"])
    video_ids = table["video_id"].to_pylist()
    captions = [caption for row in table["captions"].to_pylist() for caption in row]
    text_video = torch.tensor([i for i, row in enumerate(table["captions"].to_pylist()) for _ in row])

    weights = [ray.put({k: v.cpu() for k, v in model.state_dict().items()})]
    resources = actor_resources(num_actors)
    batch_size = cfg.eval.batch_size

    videos = open_shards(shards, split).map_batches(
        VideoEncoder,
        fn_constructor_args=(cfg, weights),
        batch_size=batch_size,
        batch_format="pyarrow",
        **resources,
    )
    texts = ray.data.from_items([{"index": i, "caption": c} for i, c in enumerate(captions)]).map_batches(
        TextEncoder,
        fn_constructor_args=(cfg, weights),
        batch_size=batch_size,
        batch_format="numpy",
        **resources,
    )
    video_cols = _collect(videos, ("video_id", *VIDEO_FIELDS))
    text_cols = _collect(texts, ("index", "sentence", "words", "word_mask"))

    position = {video_id: i for i, video_id in enumerate(video_cols["video_id"])}
    video_order = torch.tensor([position[video_id] for video_id in video_ids])
    text_order = torch.from_numpy(np.argsort(text_cols["index"], kind="stable"))
    video = VideoFeatures(**{name: torch.from_numpy(video_cols[name]) for name in VIDEO_FIELDS})
    text = TextFeatures(
        sentence=torch.from_numpy(text_cols["sentence"]),
        words=torch.from_numpy(text_cols["words"]),
        word_mask=torch.from_numpy(text_cols["word_mask"]),
    )
    return EncodedSplit(text[text_order], video[video_order], text_video, video_ids, captions)

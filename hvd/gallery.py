"""A gallery encoded once and kept: every video's features, its first-stage embedding, and a FAISS index.

An index folder holds:
    index.json            what it indexes (model, benchmark, split, dataset fingerprint, frame settings),
                          how (flat or IVF, nprobe) and its sizes
    video_ids.parquet     the gallery's videos, in row order
    features.safetensors  every `VideoFeatures` field (and those the head derives, `Head.video_side`) plus
                          `embedding` (the head's `video_embedding`); for mean-frame heads `frame_embedding` too
    stage1.faiss          a FAISS inner-product index over `embedding`

`features.safetensors` is memory-mapped when opened: stage 2 reads only its candidates' rows, so a
gallery larger than memory costs the pages its candidates lie on. Flat indexes search exactly; past
`index.ivf_from` videos an IVF index (inverted lists over k-means cells, `index.nprobe` of them searched
per query) trades a little recall for search time that grows with the cells searched, not the gallery.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import safetensors.numpy
import torch
from torch import Tensor

from hvd.config import IndexConfig
from hvd.data.folders import building
from hvd.model import VideoFeatures

META_FILE, IDS_FILE, FEATURES_FILE, ANN_FILE = "index.json", "video_ids.parquet", "features.safetensors", "stage1.faiss"
INDEX_FILES = (META_FILE, IDS_FILE, FEATURES_FILE, ANN_FILE)
SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BOOL": np.bool_, "I64": np.int64, "U8": np.uint8}


def ivf_lists(videos: int) -> int:
    """Inverted lists of an IVF index: FAISS's rule of thumb, 4 sqrt(N)."""
    return max(1, round(4 * math.sqrt(videos)))


def build_ann(embeddings: np.ndarray, cfg: IndexConfig, seed: int = 0) -> faiss.Index:
    """An inner-product index over [N, D] float32 rows: flat (exact) below `cfg.ivf_from` rows, else IVF
    trained on a sample of 40 rows per list (FAISS warns below 39)."""
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    count, dim = embeddings.shape
    if count < cfg.ivf_from:
        index = faiss.IndexFlatIP(dim)
    else:
        lists = ivf_lists(count)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(seed).choice(count, min(count, 40 * lists), replace=False)
        index.train(embeddings[np.sort(sample)])
        index.nprobe = cfg.nprobe
    index.add(embeddings)
    return index


def ann_kind(index: faiss.Index) -> str:
    return "ivf" if isinstance(index, faiss.IndexIVF) else "flat"


def search_ann(index: faiss.Index, queries: Tensor, k: int, nprobe: int | None = None) -> tuple[Tensor, Tensor]:
    """[Q, k] first-stage scores and gallery rows, best first; -1 where an IVF search found fewer than k."""
    if nprobe is not None and isinstance(index, faiss.IndexIVF):
        index.nprobe = nprobe
    scores, rows = index.search(np.ascontiguousarray(queries.detach().cpu().numpy(), dtype=np.float32), k)
    return torch.from_numpy(scores), torch.from_numpy(rows)


def ann_bytes(index: faiss.Index) -> int:
    """What the index takes in memory, about: its serialized size."""
    return int(faiss.serialize_index(index).nbytes)


def _mapped_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a read-only memory map (the format is an 8-byte header length,
    a JSON header with each tensor's dtype, shape and byte range, then the raw little-endian data)."""
    with path.open("rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    arrays = {}
    for name, info in header.items():
        dtype, shape = SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"])
        if math.prod(shape) == 0:
            arrays[name] = np.zeros(shape, dtype)  # an empty field (meanp's entities): nothing to map
        else:
            start = 8 + header_len + info["data_offsets"][0]
            arrays[name] = np.memmap(path, dtype=dtype, mode="r", offset=start, shape=shape)
    return arrays


@dataclass
class GalleryIndex:
    folder: Path
    meta: dict[str, Any]
    video_ids: list[str]
    ann: faiss.Index
    arrays: dict[str, np.ndarray]  # memory-mapped features.safetensors

    @classmethod
    def open(cls, folder: str | Path) -> GalleryIndex:
        folder = Path(folder)
        missing = [name for name in INDEX_FILES if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"gallery index {folder}: missing {', '.join(missing)}")
        ann = faiss.read_index(str(folder / ANN_FILE))
        return cls(
            folder,
            json.loads((folder / META_FILE).read_text()),
            pq.read_table(folder / IDS_FILE)["video_id"].to_pylist(),
            ann,
            _mapped_safetensors(folder / FEATURES_FILE),
        )

    def __len__(self) -> int:
        return len(self.video_ids)

    @property
    def kind(self) -> str:
        return ann_kind(self.ann)

    def embeddings(self) -> Tensor:
        """[N, D] every video's first-stage embedding (read into memory)."""
        return torch.from_numpy(np.array(self.arrays["embedding"]))

    def features(self, rows: Tensor | None = None, kind: type[VideoFeatures] = VideoFeatures) -> VideoFeatures:
        """The stored features of `rows` (gallery row numbers, any order), or of every video. `kind`: a head's
        derived form (`Head.video_side_type`), read where the index stores its fields, else the plain features."""
        if not all(name in self.arrays for name in kind.field_names()):
            kind = VideoFeatures
        if rows is None:
            return kind(**{name: torch.from_numpy(np.array(self.arrays[name])) for name in kind.field_names()})
        picked = rows.cpu().numpy()
        return kind(**{name: torch.from_numpy(self.arrays[name][picked]) for name in kind.field_names()})

    @property
    def has_frames(self) -> bool:
        """Whether it stores frame embeddings (a frame index for `eval.shortlist`; indexes built before have none)."""
        return "frame_embedding" in self.arrays

    def frame_embeddings(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """The stored frame embeddings [n, T, D] of `rows` and their frame masks [n, T]."""
        picked = rows.cpu().numpy()
        return (torch.from_numpy(self.arrays["frame_embedding"][picked]),
                torch.from_numpy(self.arrays["frame_mask"][picked]))

    def search(self, queries: Tensor, k: int, nprobe: int | None = None) -> tuple[Tensor, Tensor]:
        """First-stage scores and rows of each query's `k` best videos (see `search_ann`); an IVF index
        searches `nprobe` lists, by default as many as it was built with."""
        return search_ann(self.ann, queries, min(k, len(self)), nprobe or self.meta.get("nprobe"))


def write_index(
    folder: Path, video_ids: list[str], video: VideoFeatures, embeddings: Tensor, cfg: IndexConfig,
    meta: dict[str, Any], frame_embeddings: Tensor | None = None,
) -> GalleryIndex:
    """Write the index files into `folder` (its run's own, so never found built), published whole
    (`hvd.data.folders.building`). Every field of `video` is kept, a head's derived ones too (`Head.video_side`).
    `frame_embeddings` [N, T, D] (`RetrievalModel.frame_embeddings`): kept as float16 beside the features, for
    stage 1's frame shortlist."""
    if not (len(video_ids) == len(video) == len(embeddings)):
        raise ValueError(f"{len(video_ids)} video ids, {len(video)} feature rows, {len(embeddings)} embeddings")
    embedding = embeddings.detach().cpu().float().numpy()
    with building(folder, "index build") as staging:
        ann = build_ann(embedding, cfg)
        faiss.write_index(ann, str(staging / ANN_FILE))
        arrays = {name: np.ascontiguousarray(getattr(video, name).detach().cpu().numpy()) for name in video.field_names()}
        if frame_embeddings is not None:
            arrays["frame_embedding"] = frame_embeddings.detach().cpu().half().numpy()
        safetensors.numpy.save_file({**arrays, "embedding": embedding}, str(staging / FEATURES_FILE))
        pq.write_table(pa.table({"video_id": video_ids}), staging / IDS_FILE)
        meta = {
            **meta,
            "videos": len(video_ids),
            "dim": int(embedding.shape[1]),
            "kind": ann_kind(ann),
            "ivf_lists": ann.nlist if isinstance(ann, faiss.IndexIVF) else None,
            "nprobe": cfg.nprobe if isinstance(ann, faiss.IndexIVF) else None,
            "ann_bytes": ann_bytes(ann),
            "features_bytes": os.path.getsize(staging / FEATURES_FILE),
        }
        (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return GalleryIndex.open(folder)

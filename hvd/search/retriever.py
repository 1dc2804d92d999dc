"""A registered model with its gallery index, ready to answer captions: what `pipelines/search.py`, the Ray
Serve deployment and the MLflow pyfunc share, so the three rank alike."""

from __future__ import annotations

from dataclasses import dataclass

from hvd.config import Config
from hvd.eval.encode import Tokenizer
from hvd.gallery import GalleryIndex
from hvd.model import RetrievalModel, build_tokenizer
from hvd.registry.index_links import index_tag, linked_indexes, open_index
from hvd.registry.runs import active_tracking_uri, tracking_uri
from hvd.registry.sources import ModelSource, load_model_source
from hvd.search.query import SearchHit, search


def find_index(cfg: Config, source: ModelSource, uri: str, given: str | None = None) -> GalleryIndex:
    """`given` (runs:/RUN_ID/index or a folder), else the model version's index of eval.benchmark/eval.split,
    else its only one."""
    if given:
        return open_index(given, cfg, uri)
    linked = linked_indexes(source, uri)
    if cfg.eval.benchmark:
        tag = index_tag(cfg.eval.benchmark, cfg.eval.split)
        if tag not in linked:
            raise ValueError(f"{source.uri}: no index of {cfg.eval.benchmark}/{cfg.eval.split} "
                             f"(it has: {', '.join(sorted(linked)) or 'none'})")
        return open_index(linked[tag], cfg, uri)
    if not linked:
        raise ValueError(f"{source.uri}: no gallery index yet; build one with "
                         f"python pipelines/index.py --model {source.uri} --shards DIR")
    if len(linked) > 1:
        raise ValueError(f"{source.uri} has {len(linked)} indexes ({', '.join(sorted(linked))}): "
                         "choose one with eval.benchmark=NAME (and eval.split)")
    return open_index(next(iter(linked.values())), cfg, uri)


@dataclass
class Retriever:
    model: RetrievalModel
    tokenizer: Tokenizer
    index: GalleryIndex
    source: ModelSource
    topk: int  # stage 1's candidates per caption (eval.topk)
    nprobe: int | None  # IVF lists searched (index.nprobe)
    shortlist: int = 0  # stage 1's candidates re-ranked by their frames first (eval.shortlist)
    top_frames: int = 3  # eval.top_frames

    @classmethod
    def open(cls, model_uri: str, cfg: Config, index: str | None = None) -> Retriever:
        """The model behind `model_uri` (see `hvd.registry.model_uri.URI_FORMS`) and its gallery (`find_index`),
        read from `cfg`'s tracking store; `cfg` gives the eval and index settings."""
        with active_tracking_uri(tracking_uri(cfg)):
            model, trained, source = load_model_source(model_uri)
        return cls.for_model(model, trained, source, cfg, index)

    @classmethod
    def for_model(
        cls, model: RetrievalModel, trained: Config, source: ModelSource, cfg: Config, index: str | None = None
    ) -> Retriever:
        """`open` for a model already loaded, with its training config `trained` (the MLflow pyfunc reads its
        files from MLflow's own download)."""
        if cfg.eval.shortlist > cfg.eval.topk:  # refused before the index is opened
            model.require_mean_frame_stage1()
        tokenizer = build_tokenizer(trained.model, trained.data.max_words)
        return cls(model, tokenizer, find_index(cfg, source, tracking_uri(cfg), index), source, cfg.eval.topk,
                   cfg.index.nprobe, cfg.eval.shortlist, cfg.eval.top_frames)

    def search(self, queries: list[str], top: int) -> list[list[SearchHit]]:
        """Each caption's `top` best videos: stage 1's `max(topk, top)` candidates rescored by the full model."""
        return search(self.model, self.tokenizer, self.index, queries, max(self.topk, top), top, self.nprobe,
                      self.shortlist, self.top_frames)

"""HVD: FFSM picks each pair's frames, PFCM-compressed patches of those frames meet the caption's words."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hvd.config import HVDHeadConfig
from hvd.model.backbone import ClipBackbone
from hvd.model.clustering import keep_count
from hvd.model.features import TextFeatures, VideoFeatures
from hvd.model.ffsm import keep_frames, select_frames, select_frames_grouped
from hvd.model.heads.base import (
    FLOAT_BYTES,
    Head,
    trim_padding,
    words_entities,
    words_entities_bytes,
    words_entities_grouped,
    zero_linear,
)
from hvd.model.pfcm import PFCM, video_entities


class HVDHead(Head):
    """FFSM picks each pair's frames; PFCM-compressed patches of those frames meet the caption's words.

    `model.hvd.pfcm_scope` says where PFCM runs. `pair` is the paper's order: for every (caption, video)
    pair, PFCM clusters the patches of the frames FFSM kept for that caption (`_pair_entities`), so entities
    depend on the caption; videos keep their raw patches and every pair pays its own compression. `video`
    and `frame` are this project's cheaper variants, run once per video (`compress_patches`): all the
    video's patches together (one entity can span frames, as HVP-Net) or each frame's alone; every entity
    records the frames its patches came from, and a pair uses the entities drawn from a frame it kept.
    """

    uses_patches = True
    scores_groups = True
    explain_legend = ("frames: caption-frame cosine, FFSM's kept frames framed green; under each kept frame its "
                      "patches coloured by PFCM entity")

    def __init__(self, dim: int, cfg: HVDHeadConfig):
        super().__init__()
        self.frame_keep, self.frame_select, self.frame_margin = cfg.frame_keep, cfg.frame_select, cfg.frame_margin
        self.scope = cfg.pfcm_scope
        self.pfcm = PFCM(dim, cfg.pfcm_steps, cfg.pfcm_ratio, cfg.dpc_k)
        # Softmax logits of the query side: words, and patches for the symmetric term.
        self.word_weight, self.patch_weight = zero_linear(dim), zero_linear(dim)

    @classmethod
    def build(cls, backbone: ClipBackbone, cfg: HVDHeadConfig) -> HVDHead:
        return cls(backbone.embed_dim, cfg)

    def compress_patches(self, patches: Tensor, frame_mask: Tensor) -> tuple[Tensor, Tensor]:
        """[B, T, P, D] patch features, [B, T] frame mask -> [B, E, D] unit entities and [B, E, T] the frames
        each entity's patches come from."""
        if self.scope == "pair":  # raw patches, each owned by its frame: pairs compress their own (`_pair_entities`)
            batch, time, count, dim = patches.shape
            owner = torch.eye(time, dtype=torch.bool, device=patches.device).repeat_interleave(count, dim=0)
            return patches.reshape(batch, time * count, dim), owner[None] & frame_mask[:, None, :]
        if self.scope == "video":
            entities, _, patch_frames = video_entities(self.pfcm, patches, frame_mask)
        else:  # entity e of frame t is slot t * (E / T) + e
            entities, _ = self._compress(patches, frame_mask)
            time = patches.shape[1]
            owner = torch.eye(time, dtype=torch.bool, device=patches.device).repeat_interleave(entities.shape[1] // time, dim=0)
            patch_frames = owner[None] & frame_mask[:, None, :]
        return F.normalize(entities.float(), dim=-1), patch_frames

    def _compress(self, patches: Tensor, frame_mask: Tensor) -> tuple[Tensor, Tensor]:
        """PFCM at the head's scope: [B, E, D] entities and [B, T * P] the entity each patch joined."""
        if self.scope == "video":
            entities, assignment, _ = video_entities(self.pfcm, patches, frame_mask)
            return entities, assignment
        batch, time, count, dim = patches.shape  # padding frames are compressed too, and masked through patch_frames
        tokens, _, assignment = self.pfcm(patches.reshape(batch * time, count, dim))
        return tokens.reshape(batch, -1, dim), assignment.reshape(batch, time * count)

    def _pair_entities(self, kept: Tensor, patches: Tensor, video_index: Tensor) -> tuple[Tensor, Tensor]:
        """PFCM per pair over the patches of the frames it kept, in time order (the paper's order).

        kept [P, T] bool; patches [V, T * N, D] raw patch features of V videos; video_index [P] the video of
        each pair. Returns [P, E, D] unit entities and their mask [P, E] (pairs keeping fewer frames than
        others have fewer entities; their padding is masked through PFCM, never mixed in)."""
        pairs, time = kept.shape
        count, dim = patches.shape[1] // time, patches.shape[-1]
        frames = kept.sum(dim=1)
        width = int(frames.max())
        order = (~kept).to(torch.uint8).argsort(dim=1, stable=True)[:, :width]  # the kept frames first, in time order
        tokens = patches.view(-1, time, count, dim)[video_index[:, None], order].flatten(1, 2)  # [P, width * N, D]
        valid = (torch.arange(width, device=kept.device) < frames[:, None]).repeat_interleave(count, dim=1)
        entities, mask, _ = self.pfcm(tokens, None if bool(valid.all()) else valid)
        if mask is None:
            mask = torch.ones(entities.shape[:2], dtype=torch.bool, device=entities.device)
        return F.normalize(entities.float(), dim=-1), mask

    def similarities(self, text: TextFeatures, video: VideoFeatures) -> dict[str, Tensor]:
        kept = select_frames(text.sentence, video.frames, self.frame_keep, video.frame_mask, self.frame_select,
                             self.frame_margin)
        if self.scope != "pair":
            words_patches = self._words_patches(text, video, kept)
        else:  # every (caption, video) pair: its own entities, then the grouped word-entity score
            texts, videos = kept.shape[:2]
            pair_video = torch.arange(videos, device=kept.device).repeat(texts)
            entities, mask = self._pair_entities(kept.flatten(0, 1), video.patches, pair_video)
            entities, mask = entities.unflatten(0, (texts, videos)), mask.unflatten(0, (texts, videos))
            words, word_mask = trim_padding(text.words, text.word_mask)
            words_patches = words_entities_grouped(words, word_mask, self.word_weight(words).squeeze(-1), entities,
                                                   mask, self.patch_weight(entities).squeeze(-1))
        return {"sentence_frames": self._sentence_frames(text.sentence, video.frames, kept), "words_patches": words_patches}

    def pair_similarities(self, text: TextFeatures, video: VideoFeatures) -> dict[str, Tensor]:
        """P aligned pairs (two-stage reranking with `pfcm_scope=pair`, through `Head.grouped_similarities`)."""
        kept = keep_frames(torch.einsum("pd,ptd->pt", text.sentence, video.frames), video.frame_mask, self.frame_keep,
                           self.frame_select, self.frame_margin)
        pooled = F.normalize(torch.einsum("pt,ptd->pd", kept.to(video.frames.dtype), video.frames), dim=-1)
        entities, mask = self._pair_entities(kept, video.patches, torch.arange(len(kept), device=kept.device))
        words, word_mask = trim_padding(text.words, text.word_mask)
        words_patches = words_entities_grouped(words, word_mask, self.word_weight(words).squeeze(-1), entities[:, None],
                                               mask[:, None], self.patch_weight(entities).squeeze(-1)[:, None])[:, 0]
        return {"sentence_frames": (text.sentence * pooled).sum(dim=-1), "words_patches": words_patches}

    def grouped_similarities(self, text: TextFeatures, video: VideoFeatures) -> dict[str, Tensor]:
        if self.scope == "pair":
            return super().grouped_similarities(text, video)
        kept = select_frames_grouped(text.sentence, video.frames, self.frame_keep, video.frame_mask,
                                     self.frame_select, self.frame_margin)  # [Q, k, T]
        words, word_mask = trim_padding(text.words, text.word_mask)
        if text.sentence.ndim == 2:  # each caption, its k videos
            pooled = torch.einsum("qkt,qktd->qkd", kept.to(video.frames.dtype), video.frames)
            sentence_frames = torch.einsum("qd,qkd->qk", text.sentence, F.normalize(pooled, dim=-1))
            seen = torch.einsum("qkt,qket->qke", kept.float(), video.patch_frames.float()) > 0
        else:  # each video, its k captions
            pooled = torch.einsum("qkt,qtd->qkd", kept.to(video.frames.dtype), video.frames)
            sentence_frames = (text.sentence * F.normalize(pooled, dim=-1)).sum(dim=-1)
            seen = torch.einsum("qkt,qet->qke", kept.float(), video.patch_frames.float()) > 0
        return {
            "sentence_frames": sentence_frames,
            "words_patches": words_entities_grouped(words, word_mask, self.word_weight(words).squeeze(-1), video.patches,
                                                    seen, self.patch_weight(video.patches).squeeze(-1)),
        }

    @staticmethod
    def _sentence_frames(sentence: Tensor, frames: Tensor, kept: Tensor) -> Tensor:
        """Cosine of the sentence and the mean of the frames kept for the pair."""
        pooled = torch.einsum("tvk,vkd->tvd", kept.to(frames.dtype), frames)
        return torch.einsum("td,tvd->tv", sentence, F.normalize(pooled, dim=-1))

    def _words_patches(self, text: TextFeatures, video: VideoFeatures, kept: Tensor) -> Tensor:
        """Word-entity matching over the entities drawn from the frames FFSM kept for each pair."""
        words, word_mask = trim_padding(text.words, text.word_mask)
        seen = torch.einsum("tvk,vek->tve", kept.float(), video.patch_frames.float()) > 0  # [Nt, Nv, E]
        return words_entities(words, word_mask, self.word_weight(words).squeeze(-1), video.patches, seen,
                              self.patch_weight(video.patches).squeeze(-1))

    @torch.no_grad()
    def explain(self, sentence: Tensor, frames: Tensor, patches: Tensor, frame_mask: Tensor) -> dict[str, Tensor]:
        """What one (caption, video) pair's score looks at, for the evaluation report's pictures.

        sentence [D] and frames [T, D]: unit features; patches [T, P, D]: the backbone's patch tokens
        before PFCM; frame_mask [T]. Returns FFSM's caption-frame cosines `frame_scores` [T] and `kept`
        frames [T], and `entities` [T, P], the PFCM output token each patch was merged into (numbered per clip
        whatever the scope, so one number is one entity; -1 on padding frames, and with pair scope on the frames
        FFSM dropped).
        """
        kept = select_frames(sentence[None], frames[None], self.frame_keep, frame_mask[None], self.frame_select,
                             self.frame_margin)[0, 0]
        if self.scope == "pair":  # the kept frames' patches compressed together; the other frames' are not
            _, _, assignment = self.pfcm(patches[kept][None].flatten(1, 2))
            entities = torch.full(patches.shape[:2], -1, dtype=assignment.dtype, device=patches.device)
            entities[kept] = assignment.view(-1, patches.shape[1])
            return {"frame_scores": frames @ sentence, "kept": kept, "entities": entities}
        tokens, assignment = self._compress(patches[None], frame_mask[None])
        entities = assignment.view(patches.shape[:2])
        if self.scope == "frame":  # numbered per clip, as compress_patches' slots: entity e of frame t is t * E + e
            time = patches.shape[0]
            entities = entities + torch.arange(time, device=entities.device)[:, None] * (tokens.shape[1] // time)
        return {"frame_scores": frames @ sentence, "kept": kept, "entities": entities.masked_fill(~frame_mask[:, None], -1)}

    def pair_bytes(self, text: TextFeatures, video: VideoFeatures) -> int:
        words, (entities, dim), frames = text.words.shape[1], video.patches.shape[1:], video.frames.shape[1]
        if self.scope == "pair":  # the kept frames' patch tokens through PFCM: tokens, its layers, its distances
            kept = self.frame_keep if self.frame_select == "share" else 1.0  # the other rules: at most every frame
            tokens = keep_count(frames, kept) * (entities // frames)
            return words_entities_bytes(words, keep_count(tokens, 0.5)) + FLOAT_BYTES * (12 * tokens * dim + 3 * tokens**2)
        return words_entities_bytes(words, entities) + FLOAT_BYTES * (frames + 2 * dim)  # and the kept-frame mean

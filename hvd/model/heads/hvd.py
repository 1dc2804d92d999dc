"""HVD: FFSM picks each pair's frames, PFCM-compressed patches of those frames meet the caption's words."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hvd.config import HVDHeadConfig
from hvd.model.backbone import ClipBackbone
from hvd.model.features import TextFeatures, VideoFeatures
from hvd.model.ffsm import select_frames, select_frames_grouped
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

    PFCM runs once per video, not per pair (`compress_patches`), over each frame's patches on its own
    (`model.hvd.pfcm_scope=frame`: clusters never span frames) or over all the video's patches together
    (`video`, as HVP-Net: one entity can span frames). Every entity records the frames its patches came
    from; a pair's word-patch score uses the entities drawn from at least one frame FFSM kept for it. With
    frame scope that is exactly the kept frames compressed on their own, the paper's "patch features of
    the selected frames"; with video scope it is the closest a once-per-video compression comes to it.
    """

    uses_patches = True
    scores_groups = True
    explain_legend = ("frames: caption-frame cosine, FFSM's kept frames framed green; under each kept frame its "
                      "patches coloured by PFCM entity")

    def __init__(self, dim: int, cfg: HVDHeadConfig):
        super().__init__()
        self.frame_keep = cfg.frame_keep
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

    def similarities(self, text: TextFeatures, video: VideoFeatures) -> dict[str, Tensor]:
        kept = select_frames(text.sentence, video.frames, self.frame_keep, video.frame_mask)
        return {
            "sentence_frames": self._sentence_frames(text.sentence, video.frames, kept),
            "words_patches": self._words_patches(text, video, kept),
        }

    def grouped_similarities(self, text: TextFeatures, video: VideoFeatures) -> dict[str, Tensor]:
        kept = select_frames_grouped(text.sentence, video.frames, self.frame_keep, video.frame_mask)  # [Q, k, T]
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
        frames [T], and `entities` [T, P], the PFCM output token each patch was merged into (numbered per
        frame with frame scope, per video with video scope; -1 on padding frames).
        """
        kept = select_frames(sentence[None], frames[None], self.frame_keep, frame_mask[None])[0, 0]
        _, assignment = self._compress(patches[None], frame_mask[None])
        entities = assignment.view(patches.shape[:2]).masked_fill(~frame_mask[:, None], -1)
        return {"frame_scores": frames @ sentence, "kept": kept, "entities": entities}

    def pair_bytes(self, text: TextFeatures, video: VideoFeatures) -> int:
        words, (entities, dim), frames = text.words.shape[1], video.patches.shape[1:], video.frames.shape[1]
        return words_entities_bytes(words, entities) + FLOAT_BYTES * (frames + 2 * dim)  # and the kept-frame mean

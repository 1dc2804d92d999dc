"""HCMI (Jiang et al., "Tencent Text-Video Retrieval: Hierarchical Cross-Modal Interactions with Multi-Level
Representations", arXiv 2204.03382): frame-clip-video met by word-phrase-sentence, one InfoNCE per level.

Video, per clip once: the frames attend to each other (`FrameTransformer`, as EERCF's), the contextualised
frames are clustered into clips by DPC-KNN (`model.hcmi.clip_ratio` of the real frames), each clip the
exp(score)-weighted mean of its frames, and the video token the softmax(score)-weighted mean of the clips.
Text, per caption once (`text_features`, before scoring): the words (CLIP's token features), phrases by the
same clustering and merge over the words (`model.hcmi.phrase_ratio`), and the sentence (CLIP's end-of-text
feature).
Scores: frame-word and clip-phrase by token-wise matching (each word to its best frame and each frame to
its best word, each side weighted by a learned softmax, averaged: HVD's word-patch matching), and
video-sentence by cosine. The loss is an InfoNCE per level; the retrieval score is their sum. Reranking
scores each query with its own candidates in one pass per level (`grouped_similarities`).

Not HCMI as published: its code is not public, and this follows the abstract and the paper's description
where they are explicit (frame self-attention, adaptive clustering of frames into clips, three levels each
with its InfoNCE, label denoising, marginal sample enhancement) but leaves out the abstract's clip-to-clip
interaction: the clips are merged into the video token directly, with no attention among them first
(docs/heads.md, "Departures from the references").
Where the paper's description leaves a choice open, this reads it so:
- phrases are grouped as clips are (density-peak clusters merged by learned attention weights), so both
  sides of the clip-phrase level come from one operator; a cluster need not be contiguous in time or text;
- `model.hcmi.label_denoising`: in-batch InfoNCE labels say a caption matches only its own video, which is
  wrong when another caption of the batch says the same thing. The targets become
  (1 - 0.5) one-hot + 0.5 softmax(caption-caption cosine / 0.02) over the batch, from the model's own
  detached sentence features: a caption's label spreads to the videos of the captions it encodes nearly
  alike (adaptively: as the text encoder learns, the set narrows), and stays one-hot where none is close.
  Targets from the model's own cross-modal predictions would add no gradient (the soft-target term's
  gradient is zero at its own prediction), hence the caption side;
- `model.hcmi.sample_enhancement`: a negative scored within 0.1 (cosine) of the positive, or above it, is a
  marginal sample; its term in the InfoNCE denominator counts twice (log 2 added to its logit, selected
  without gradient), so the loss concentrates on the pairs at the decision margin.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from open_clip import CLIP
from open_clip.transformer import Transformer
from torch import Tensor, nn

from hvd.config import HCMIHeadConfig
from hvd.model.backbone import ClipBackbone
from hvd.model.clustering import dpc_knn, merge_clusters
from hvd.model.features import TextFeatures, VideoFeatures
from hvd.model.heads.base import (
    FLOAT_BYTES,
    Head,
    masked_softmax,
    trim_padding,
    words_entities,
    words_entities_bytes,
    words_entities_grouped,
    zero_linear,
)
from hvd.model.temporal import FrameTransformer

DENOISE_WEIGHT = 0.5  # share of the target that follows caption-caption similarity
DENOISE_TEMPERATURE = 0.02  # a caption 0.1 less similar than itself gets e^-5 of its weight
MARGIN = 0.1  # a negative within this cosine of the positive is marginal
ENHANCE = 2.0  # how many times a marginal negative counts in the InfoNCE denominator


@dataclasses.dataclass
class PhrasedText(TextFeatures):
    """Captions with their phrases: a `Features`, so slicing and gathering candidates carry the phrases along."""

    phrases: Tensor  # [B, M, D] unit phrase tokens, zero on empty slots (M: the most phrases of any caption)
    phrase_mask: Tensor  # [B, M] bool, False on empty slots


class AdaptiveGrouping(nn.Module):
    """HCMI's adaptive clustering: DPC-KNN on a sequence's tokens, each cluster merged by the exp(score)-weighted
    mean of its tokens (the learned score is each token's attention weight inside its group)."""

    def __init__(self, dim: int, ratio: float, k: int):
        super().__init__()
        self.ratio, self.k = ratio, k
        self.score = zero_linear(dim)

    def forward(self, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """[B, N, D] unit tokens, [B, N] mask -> [B, M, D] unit groups (zero on empty slots), [B, M] their
        mask, and [B, N] the group of every token (-1 on padding)."""
        clusters = dpc_knn(tokens, self.ratio, self.k, None if bool(mask.all()) else mask)
        merged = merge_clusters(tokens, clusters, self.score(tokens).squeeze(-1))
        return F.normalize(merged, dim=-1), clusters.mask, clusters.assignment


def denoised_targets(sentence: Tensor) -> Tensor:
    """[N, N] soft targets, row i for pair i's caption as a query over the videos and for pair i's video as a
    query over the captions (both are decided by caption i): one-hot, partly moved to the pairs whose
    captions the model encodes nearly alike. Rows sum to 1."""
    with torch.no_grad():
        alike = (sentence @ sentence.T / DENOISE_TEMPERATURE).softmax(dim=-1)
        eye = torch.eye(len(sentence), device=sentence.device)
        return (1 - DENOISE_WEIGHT) * eye + DENOISE_WEIGHT * alike


def hierarchical_infonce(similarity: Tensor, scale: Tensor, targets: Tensor | None, enhance: bool) -> Tensor:
    """Symmetric InfoNCE of one level's [N, N] similarity (pair i is the positive) with soft `targets` (None:
    one-hot) and, with `enhance`, marginal negatives counted ENHANCE times."""

    def one_way(s: Tensor, target: Tensor) -> Tensor:
        logits = scale * s
        if enhance:
            with torch.no_grad():
                marginal = s >= s.diagonal()[:, None] - MARGIN
                marginal.fill_diagonal_(False)
            logits = logits + marginal * math.log(ENHANCE)
        return F.cross_entropy(logits, target)

    target = torch.arange(len(similarity), device=similarity.device) if targets is None else targets
    return (one_way(similarity, target) + one_way(similarity.T, target)) / 2


class HCMIHead(Head):
    scores_groups = True
    stage1_is_mean_frame = False  # its own coarse embeddings
    explain_legend = ("frames: caption cosine of the clip each frame was clustered into (HCMI's clip tokens); "
                      "the best clip's frames framed green")

    def __init__(self, dim: int, cfg: HCMIHeadConfig, text: Transformer, max_frames: int):
        super().__init__()
        self.label_denoising, self.sample_enhancement = cfg.label_denoising, cfg.sample_enhancement
        self.temporal = FrameTransformer(dim, cfg.temporal_layers, text, max_frames)
        self.clips = AdaptiveGrouping(dim, cfg.clip_ratio, cfg.dpc_k)
        self.phrases = AdaptiveGrouping(dim, cfg.phrase_ratio, cfg.dpc_k)
        self.video_weight = zero_linear(dim)
        self.frame_weight, self.word_weight = zero_linear(dim), zero_linear(dim)
        self.clip_weight, self.phrase_weight = zero_linear(dim), zero_linear(dim)

    @classmethod
    def build(cls, backbone: ClipBackbone, cfg: HCMIHeadConfig) -> HCMIHead:
        return cls(backbone.embed_dim, cfg, backbone.clip.transformer, backbone.context_length)

    def init_from_clip(self, clip: CLIP) -> None:
        self.temporal.init_from_clip(clip)

    def video_features(
        self, frames: Tensor, frame_mask: Tensor, patches: Tensor | None, layers: list[tuple[Tensor, Tensor]]
    ) -> VideoFeatures:
        """frames: CLIP's unit frames; frame_views[:, 0]: the contextualised frames; patches: the clips, and
        patch_frames the frames each clip was clustered from."""
        unit = F.normalize(frames.float(), dim=-1)
        context, clips, assignment = self._clip_tokens(unit, frame_mask)
        return VideoFeatures(unit, frame_mask, clips, clip_frames(assignment, clips.shape[1]), context[:, None])

    def _clip_tokens(self, unit: Tensor, frame_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Unit frames [B, T, D] -> contextualised frames [B, T, D], clips [B, C, D], each frame's clip [B, T]."""
        context = F.normalize(self.temporal(unit, frame_mask).float(), dim=-1)
        clips, _, assignment = self.clips(context, frame_mask)
        return context, clips, assignment.masked_fill(~frame_mask, -1)

    def video_token(self, video: VideoFeatures) -> Tensor:
        """[..., D] the video level of videos [..., C, D]: the clips merged by their learned weights."""
        weight = masked_softmax(self.video_weight(video.patches).squeeze(-1), video.patch_frames.any(dim=-1))
        return F.normalize(torch.einsum("...c,...cd->...d", weight, video.patches), dim=-1)

    def video_embedding(self, video: VideoFeatures) -> Tensor:
        return self.video_token(video)

    def text_features(self, text: TextFeatures) -> PhrasedText:
        """The captions with their phrases (clustered over the words, whatever the caption is scored against),
        so that reranking clusters each caption once, not once per candidate."""
        if isinstance(text, PhrasedText):
            return text
        words, word_mask = trim_padding(text.words, text.word_mask)
        captions = word_mask.shape[:-1]  # [B], or [Q, k] for candidate captions
        phrases, phrase_mask, _ = self.phrases(words.flatten(0, -3), word_mask.flatten(0, -2))
        return PhrasedText(text.sentence, text.words, text.word_mask, phrases.unflatten(0, captions),
                           phrase_mask.unflatten(0, captions))

    def similarities(self, text: TextFeatures, video: VideoFeatures) -> dict[str, Tensor]:
        return self._levels(self.text_features(text), video, grouped=False)

    def grouped_similarities(self, text: TextFeatures, video: VideoFeatures) -> dict[str, Tensor]:
        return self._levels(self.text_features(text), video, grouped=True)

    def _levels(self, text: PhrasedText, video: VideoFeatures, grouped: bool) -> dict[str, Tensor]:
        """The three levels' similarities: [Nt, Nv] of every caption with every video, or with `grouped` [Q, k]
        of each query with its own candidates (`Head.grouped_similarities`' layouts)."""
        words, word_mask = trim_padding(text.words, text.word_mask)
        phrases, phrase_mask = trim_padding(text.phrases, text.phrase_mask)  # a gathered subset may use fewer
        token = self.video_token(video)
        if not grouped:
            video_sentence = text.sentence @ token.T
        elif text.sentence.ndim == 2:  # each caption, its k videos
            video_sentence = torch.einsum("qd,qkd->qk", text.sentence, token)
        else:  # each video, its k captions
            video_sentence = torch.einsum("qkd,qd->qk", text.sentence, token)
        return {
            "frames_words": self._match(words, word_mask, self.word_weight, video.frame_views[..., 0, :, :],
                                        video.frame_mask, self.frame_weight, grouped),
            "clips_phrases": self._match(phrases, phrase_mask, self.phrase_weight, video.patches,
                                         video.patch_frames.any(dim=-1), self.clip_weight, grouped),
            "video_sentence": video_sentence,
        }

    @staticmethod
    def _match(text_tokens: Tensor, text_mask: Tensor, text_weight: nn.Linear, video_tokens: Tensor, video_mask: Tensor,
               video_weight: nn.Linear, grouped: bool) -> Tensor:
        """Token-wise matching of one level's text and video tokens: [Nt, Nv], or with `grouped` [Q, k]
        (`words_entities_grouped`: each query's side is matched against its candidates without being copied)."""
        text_logits, video_logits = text_weight(text_tokens).squeeze(-1), video_weight(video_tokens).squeeze(-1)
        if not grouped:
            seen = video_mask[None].expand(len(text_tokens), -1, -1)
            return words_entities(text_tokens, text_mask, text_logits, video_tokens, seen, video_logits)
        if text_tokens.ndim == 4:  # each video, its k captions: the video's tokens count for every caption
            video_mask = video_mask[:, None].expand(-1, text_mask.shape[1], -1)
        return words_entities_grouped(text_tokens, text_mask, text_logits, video_tokens, video_mask, video_logits)

    def contrastive_losses(self, text: TextFeatures, video: VideoFeatures, similarities: dict[str, Tensor],
                           scale: Tensor) -> dict[str, Tensor]:
        targets = denoised_targets(text.sentence) if self.label_denoising else None
        return {name: hierarchical_infonce(s, scale, targets, self.sample_enhancement) for name, s in similarities.items()}

    @torch.no_grad()
    def explain(self, sentence: Tensor, frames: Tensor, patches: Tensor, frame_mask: Tensor) -> dict[str, Tensor]:
        """One pair: the clip each frame joined (`groups`, [T], -1 on padding), each frame's clip's cosine with
        the caption (`frame_scores`), and the best clip's frames (`kept`)."""
        _, clips, assignment = self._clip_tokens(frames[None], frame_mask[None])
        groups = assignment[0]
        clip_scores = clips[0] @ sentence
        best = clip_scores.masked_fill(~clip_frames(assignment, clips.shape[1])[0].any(dim=-1), -math.inf).argmax()
        return {"frame_scores": clip_scores[groups.clamp(min=0)], "kept": groups == best, "groups": groups}

    def pair_bytes(self, text: TextFeatures, video: VideoFeatures) -> int:
        words, frames, clips = text.words.shape[1], video.frames.shape[1], video.patches.shape[1]
        phrases = math.ceil(words * self.phrases.ratio)
        return words_entities_bytes(words, frames) + words_entities_bytes(phrases, clips) + FLOAT_BYTES * 2


def clip_frames(assignment: Tensor, clips: int) -> Tensor:
    """[B, T] clip of every frame (-1: padding) -> [B, C, T] bool, the frames each clip was merged from."""
    one_hot = F.one_hot(assignment.clamp(min=0), clips).bool() & (assignment >= 0)[..., None]
    return one_hot.transpose(1, 2)

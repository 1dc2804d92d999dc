"""What every similarity head answers, and the pieces several heads share.

Training, scoring and evaluation treat heads alike through `Head`: the video features a head keeps per
video (`video_features`, run once per video at encoding time), what it derives from captions alone
(`text_features`, run once per caption set before scoring) and from videos alone (`video_side`, once per
video before reranking), the named [Nt, Nv] similarity matrices of a batch (`similarities`; the loss is an
InfoNCE on each, weighted by `part_weights`, or the head's own `contrastive_losses`, and the retrieval score
their sum weighted by `score_weights`, by default `part_weights`), extra loss terms (`regularizers`), the
cheap features of a first retrieval stage (the dot product of `text_embedding` and `video_embedding`) and
how many bytes one (caption, video) pair costs while scoring (`pair_bytes`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from open_clip import CLIP
from torch import Tensor, nn

from hvd.model.backbone import ClipBackbone
from hvd.model.features import TextFeatures, VideoFeatures
from hvd.model.losses import symmetric_infonce

FLOAT_BYTES = 4


def mean_frame_embedding(frames: Tensor, frame_mask: Tensor) -> Tensor:
    """[B, T, D] unit frame features, [B, T] mask -> [B, D] unit video feature (CLIP4Clip's masked mean pooling)."""
    return F.normalize(torch.einsum("btd,bt->bd", frames, frame_mask.to(frames.dtype)), dim=-1)


def masked_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    return logits.masked_fill(~mask, -math.inf).softmax(dim=-1)


def no_patches(frames: Tensor) -> tuple[Tensor, Tensor]:
    """Empty entities [B, 0, D] and their frames [B, 0, T], for heads that score without patches."""
    batch, time, dim = frames.shape
    return frames.new_zeros(batch, 0, dim), torch.zeros(batch, 0, time, dtype=torch.bool, device=frames.device)


def zero_linear(dim: int) -> nn.Linear:
    """Token -> softmax logit with no bias (a softmax ignores it) and zero weights, so a learned weighting
    starts as a plain mean."""
    layer = nn.Linear(dim, 1, bias=False)
    nn.init.zeros_(layer.weight)
    return layer


def trim_padding(words: Tensor, word_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Drop the trailing word slots that are padding in every caption ([..., L, D] words, [..., L] mask)."""
    length = int(word_mask.flatten(0, -2).any(dim=0).nonzero().max()) + 1
    return words[..., :length, :], word_mask[..., :length]


def pair_up(text: TextFeatures, video: VideoFeatures) -> tuple[TextFeatures, VideoFeatures, tuple[int, int]]:
    """Groups (text [Q] with video [Q, k, ...], or text [Q, k, ...] with video [Q]) as Q * k aligned pairs,
    the single side repeated for each of its k candidates; and (Q, k)."""
    if text.sentence.ndim == 2:  # each caption, its k videos
        groups = tuple(video.frame_mask.shape[:2])
        text = text.map(lambda t: t[:, None].expand(-1, groups[1], *t.shape[1:]))
    else:  # each video, its k captions
        groups = tuple(text.word_mask.shape[:2])
        video = video.map(lambda t: t[:, None].expand(-1, groups[1], *t.shape[1:]))
    return text.map(lambda t: t.flatten(0, 1)), video.map(lambda t: t.flatten(0, 1)), groups


def word_weights(word_logits: Tensor, word_mask: Tensor, raw: bool = False) -> Tensor:
    """[..., L] weight of each word: a softmax of its logit over the caption's words, or with `raw` the
    logit itself (no normalisation, as HVP-Net weighs words); padding slots weigh 0 either way."""
    return word_logits.masked_fill(~word_mask, 0.0) if raw else masked_softmax(word_logits, word_mask)


def words_entities(
    words: Tensor, word_mask: Tensor, word_logits: Tensor, entities: Tensor, seen: Tensor, entity_logits: Tensor,
    raw_word_weights: bool = False,
) -> Tensor:
    """[Nt, Nv] mean of word-to-best-entity and entity-to-best-word similarity, each side weighted by a
    softmax of its logits (the word side by the logits themselves with `raw_word_weights`): the
    fine-grained score of HVD and HVP-Net.

    words [Nt, L, D] (mask [Nt, L], logits [Nt, L]); entities [Nv, E, D] (logits [Nv, E]); seen
    [Nt, Nv, E]: the entities a pair may use (at least one per pair).
    """
    words = _pad_with_first_word(words, word_mask)
    count, slots, dim = entities.shape
    similarity = (words.flatten(0, 1) @ entities.reshape(-1, dim).T).view(
        len(words), words.shape[1], count, slots
    )  # [Nt, L, Nv, E], one matrix product, no layout copy
    best_entity = similarity.masked_fill(~seen[:, None], -math.inf).amax(dim=-1)  # [Nt, L, Nv]
    text_to_video = torch.einsum("tlv,tl->tv", best_entity, word_weights(word_logits, word_mask, raw_word_weights))
    best_word = similarity.amax(dim=1)  # [Nt, Nv, E]
    entity_weight = masked_softmax(entity_logits.expand_as(best_word), seen)
    video_to_text = (best_word * entity_weight).sum(dim=-1)
    return (text_to_video + video_to_text) / 2


def _pad_with_first_word(words: Tensor, word_mask: Tensor) -> Tensor:
    """Padding slots take a copy of the caption's first word: a duplicate leaves every max over words
    unchanged and gets no word weight, so the big similarity tensor needs no mask of its own."""
    first = word_mask.to(torch.uint8).argmax(dim=1)
    return torch.where(word_mask[..., None], words, words[torch.arange(len(words), device=words.device), first][:, None])


def words_entities_grouped(
    words: Tensor, word_mask: Tensor, word_logits: Tensor, entities: Tensor, seen: Tensor, entity_logits: Tensor,
    raw_word_weights: bool = False,
) -> Tensor:
    """[Q, k] `words_entities` of each query with its own k candidates, without copying the query's side:
    captions words [Q, L, D] with their videos' entities [Q, k, E, D] (logits [Q, k, E]), or a video's
    entities [Q, E, D] (logits [Q, E]) with its captions' words [Q, k, L, D]; seen [Q, k, E]."""
    if words.ndim == 3:  # each caption, its k videos: one product per caption over all its entities
        queries, count, slots, dim = entities.shape
        words = _pad_with_first_word(words, word_mask)
        similarity = (words @ entities.reshape(queries, count * slots, dim).mT).view(queries, -1, count, slots)
        similarity = similarity.transpose(1, 2)  # [Q, k, L, E]
        word_weight = word_weights(word_logits, word_mask, raw_word_weights)[:, None]
    else:  # each video, its k captions
        queries, count, length, dim = words.shape
        words = _pad_with_first_word(words.flatten(0, 1), word_mask.flatten(0, 1))
        similarity = (words.view(queries, count * length, dim) @ entities.mT).view(queries, count, length, -1)
        word_weight = word_weights(word_logits, word_mask, raw_word_weights)
        entity_logits = entity_logits[:, None]
    best_entity = similarity.masked_fill(~seen[:, :, None], -math.inf).amax(dim=-1)  # [Q, k, L]
    text_to_video = (best_entity * word_weight).sum(dim=-1)
    best_word = similarity.amax(dim=2)  # [Q, k, E]
    video_to_text = (best_word * masked_softmax(entity_logits.expand_as(best_word), seen)).sum(dim=-1)
    return (text_to_video + video_to_text) / 2


def words_entities_bytes(words: int, entities: int) -> int:
    """Per pair: the word-entity similarities and their masked copy, and the entity-side reductions."""
    return FLOAT_BYTES * (2 * words * entities + 2 * words + 6 * entities)


class Head(nn.Module):
    uses_patches = False  # the backbone's patch tokens reach `video_features` (else None: not computed)
    vision_layers: tuple[int, ...] = ()  # ViT blocks whose tokens `video_features` also reads (HVP-Net)
    part_weights: dict[str, float] = {}  # weight of each similarity in the loss and the score; absent: 1
    # The retrieval score's weights where they differ from the loss's (EERCF ranks with its own); None: part_weights
    score_weights: dict[str, float] | None = None
    scores_groups = False  # has `grouped_similarities`
    # `video_embedding` is the mean frame, so stage 1 can score each frame alike (`eval.shortlist`)
    stage1_is_mean_frame = True
    video_side_type: type[VideoFeatures] = VideoFeatures  # what `video_side` returns

    @classmethod
    def build(cls, backbone: ClipBackbone, cfg: Any) -> Head:
        """The head on top of `backbone`, from its section of `ModelConfig` (None for a head without knobs):
        how `hvd.model.factory` builds every head named in `hvd.config.HEADS`."""
        return cls()

    def video_features(
        self, frames: Tensor, frame_mask: Tensor, patches: Tensor | None, layers: list[tuple[Tensor, Tensor]]
    ) -> VideoFeatures:
        """What the head keeps per video. frames [B, T, D] (the backbone's pooled output, not normalised),
        frame_mask [B, T], patches [B, T, P, D] or None, and for each of `vision_layers` that block's
        (frames [B, T, D], patches [B, T, P, D]) after CLIP's ln_post and projection."""
        unit = F.normalize(frames.float(), dim=-1)
        entities, patch_frames = no_patches(unit) if patches is None else self.compress_patches(patches, frame_mask)
        return VideoFeatures(unit, frame_mask, entities.float(), patch_frames, no_frame_views(unit))

    def compress_patches(self, patches: Tensor, frame_mask: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} uses no patches")

    def text_features(self, text: TextFeatures) -> TextFeatures:
        """The captions with whatever the head derives from them alone (HCMI: its phrases), computed once per
        caption set by the scoring paths so that no (caption, candidate) block repeats it; by default nothing.
        At scoring time, not encoding time: the result may depend on the set (padding to its longest caption).
        The head's similarities accept either form, and features already derived come back unchanged."""
        return text

    def video_side(self, video: VideoFeatures) -> VideoFeatures:
        """The videos with whatever the head derives from them alone (HVP-Net: its frame and entity weights),
        computed once per video by the reranking paths so that no (caption, candidate) pair repeats it; by
        default nothing. Like `text_features`, the head's similarities accept either form, and features
        already derived come back unchanged."""
        return video

    def similarities(self, text: TextFeatures, video: VideoFeatures) -> dict[str, Tensor]:
        raise NotImplementedError

    def grouped_similarities(self, text: TextFeatures, video: VideoFeatures) -> dict[str, Tensor]:
        """[Q, k] similarities of each query with its own k candidates, for reranking many queries in one pass:
        text [Q] with video fields [Q, k, ...] (each caption's candidate videos), or text fields [Q, k, ...]
        with video [Q] (each video's candidate captions). By default the groups are laid out as Q * k aligned
        pairs for `pair_similarities`. Heads without either (`scores_groups` False) rerank one query at a
        time through `similarities`."""
        texts, videos, groups = pair_up(text, video)
        return {name: s.view(groups) for name, s in self.pair_similarities(texts, videos).items()}

    def pair_similarities(self, text: TextFeatures, video: VideoFeatures) -> dict[str, Tensor]:
        """[P] similarities of P aligned (caption, video) pairs, text [P] with video [P]: the diagonal of
        `similarities` without the rest of the matrix."""
        raise NotImplementedError(f"{type(self).__name__} scores whole matrices only")

    def contrastive_losses(self, text: TextFeatures, video: VideoFeatures, similarities: dict[str, Tensor],
                           scale: Tensor) -> dict[str, Tensor]:
        """The InfoNCE of each similarity of the gathered batch (pair i the positive), weighted by `part_weights`."""
        return {name: self.part_weights.get(name, 1.0) * symmetric_infonce(scale * s) for name, s in similarities.items()}

    def regularizers(self, text: TextFeatures, video: VideoFeatures) -> dict[str, Tensor]:
        """Weighted loss terms besides the InfoNCE of each similarity, on the gathered batch; none by default."""
        return {}

    def text_embedding(self, text: TextFeatures) -> Tensor:
        """[Nt, D]: the caption's side of the cheap first retrieval stage (a dot product with
        `video_embedding`); by default the sentence, as in CLIP4Clip's meanP score."""
        return text.sentence

    def video_embedding(self, video: VideoFeatures) -> Tensor:
        """[Nv, D]: the video's side of the first stage, computed once per video (a gallery index stores it);
        by default the mean frame."""
        return mean_frame_embedding(video.frames, video.frame_mask)

    def init_from_clip(self, clip: CLIP) -> None:
        """Seed head modules from pretrained CLIP weights, called once they are loaded; nothing by default."""

    def pair_bytes(self, text: TextFeatures, video: VideoFeatures) -> int:
        raise NotImplementedError


def no_frame_views(frames: Tensor) -> Tensor:
    """[B, 0, T, D]: a head that derives no frame features of its own."""
    return frames.new_zeros(frames.shape[0], 0, *frames.shape[1:])

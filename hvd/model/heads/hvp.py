"""HVP-Net ("Delving Deeper: Hierarchical Visual Perception for Robust Video-Text Retrieval"): frames and
patches of several ViT blocks, compressed by one PFCM and each block matched with the caption.

Every block in `model.hvp.layers` (default the first, the (depth - 1) // 2-th and the last: 0, 5, 11 on
ViT-B's 12 blocks, HVP-Net's choice; 0, 1, 3 on the tiny preset's 4) gives frame and patch tokens through
CLIP's own ln_post and projection; each block's patches of the whole video go through PFCM (one entity can
span frames), and each block scores three similarities, each side weighted by a learned MLP (a near-zero
last layer, so training starts from plain means). As in HVP-Net, one PFCM and one set of weighting networks
serve every block:
- sentence-frame: frames weighted by the frame MLP (softmax), cosine with the sentence;
- sentence-patch: entities weighted by the patch MLP (softmax), cosine with the sentence;
- word-patch: word-to-best-entity weighted by the word MLP and entity-to-best-word weighted by the patch
  MLP, averaged (as HVD's word-patch term, without frame selection). The word weights are the MLP's raw
  outputs, as HVP-Net's (`model.hvp.word_weights=softmax`: a softmax over the caption's words instead).
Scores and losses are summed over blocks. Departures (docs/heads.md, "Departures from the references"): word
weights come from the query's own words at evaluation as in training (HVP-Net's public evaluation code
weighs with the paired caption's words: not copied).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hvd.config import HVPHeadConfig
from hvd.model.backbone import ClipBackbone
from hvd.model.features import TextFeatures, VideoFeatures, pad_to
from hvd.model.heads.base import (
    FLOAT_BYTES,
    Head,
    masked_softmax,
    no_frame_views,
    trim_padding,
    words_entities,
    words_entities_bytes,
    words_entities_grouped,
)
from hvd.model.pfcm import PFCM, video_entities


def default_layers(depth: int) -> tuple[int, ...]:
    """The first, the middle (index (depth - 1) // 2, rounded down) and the last block of a `depth`-block ViT:
    HVP-Net's (0, 5, 11) on ViT-B's 12 blocks; (0, 1, 3) on the tiny preset's 4."""
    return tuple(sorted({0, (depth - 1) // 2, depth - 1}))


class WeightMLP(nn.Module):
    """Token -> softmax logit: Linear, GELU, Linear to one value. The last layer starts near zero (std 1e-3),
    so the weights start as a plain mean, yet both layers get gradients from the first step."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 1, bias=False))
        nn.init.normal_(self.net[-1].weight, std=1e-3)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)


def weighted_cosine(sentence: Tensor, tokens: Tensor, weights: Tensor, grouped: bool) -> Tensor:
    """The weighted sum of the sentence's cosines with each video's tokens (frames or entities, [..., K, D] with
    weights [..., K]): [Nt, Nv], or with `grouped` [Q, k] in `Head.grouped_similarities`' layouts. Grouped, one
    batched matrix-vector product per query: a three-operand einsum was a third of HVP-Net's reranking time."""
    if not grouped:
        return torch.einsum("td,vkd,vk->tv", sentence, tokens, weights)
    if sentence.ndim == 2:  # each caption [Q, D], its videos' tokens [Q, k, K, D]
        queries, count, length, dim = tokens.shape
        cosines = (tokens.reshape(queries, count * length, dim) @ sentence[:, :, None]).view(queries, count, length)
        return (cosines * weights).sum(dim=-1)
    return ((sentence @ tokens.mT) * weights[:, None]).sum(dim=-1)  # each video's tokens [Q, K, D], its captions [Q, k, D]


@dataclasses.dataclass
class WeightedText(TextFeatures):
    """Captions (trimmed to their longest) with their word weights' logits, derived once per caption."""

    word_logits: Tensor  # [B, L]


@dataclasses.dataclass
class WeightedVideo(VideoFeatures):
    """Videos with their frame and entity weights' logits: they depend on the video alone, so reranking derives
    them once per video rather than once per (caption, candidate) pair."""

    frame_logits: Tensor  # [B, K, T] each block's frame logits, blocks in `vision_layers` order
    entity_logits: Tensor  # [B, E] every entity's logit, the blocks' entities one after another as in `patches`


@dataclasses.dataclass
class Block:
    """One ViT block's side of the videos: frames [..., T, D] with their logits [..., T], entities [..., E, D] with
    their logits [..., E], and which entities are real [..., E]."""

    frames: Tensor
    frame_logits: Tensor
    entities: Tensor
    entity_logits: Tensor
    real: Tensor


class BlockMatcher(nn.Module):
    """The PFCM and the word, patch and frame weights that every ViT block's tokens go through (shared, as
    HVP-Net shares them)."""

    def __init__(self, dim: int, cfg: HVPHeadConfig):
        super().__init__()
        self.pfcm = PFCM(dim, cfg.pfcm_steps, cfg.pfcm_ratio, cfg.dpc_k)
        self.word_weight, self.patch_weight, self.frame_weight = WeightMLP(dim), WeightMLP(dim), WeightMLP(dim)
        self.raw_word_weights = cfg.word_weights == "raw"

    def compress(self, patches: Tensor, frame_mask: Tensor) -> tuple[Tensor, Tensor]:
        """[B, T, P, D] -> [B, E, D] unit entities of the whole video and [B, E, T] the frames each came from.

        E is what T whole frames give, padded with empty slots where the batch's videos are all shorter: blocks
        sit one after another in the features, so a batch's (a rank's, a micro-batch's) E must not depend on the
        batch for the blocks to line up when batches are concatenated."""
        entities, _, patch_frames = video_entities(self.pfcm, patches, frame_mask)
        slots = self.pfcm.entity_count(patches.shape[1] * patches.shape[2])
        return pad_to(F.normalize(entities.float(), dim=-1), slots), pad_to(patch_frames, slots)

    def similarities(self, text: WeightedText, block: Block, frame_mask: Tensor, grouped: bool) -> dict[str, Tensor]:
        """One block's [Nt, Nv] similarities of every caption with every video, or with `grouped` [Q, k] of each
        query with its own candidates (`Head.grouped_similarities`' layouts)."""
        frame_weight = masked_softmax(block.frame_logits, frame_mask)
        entity_weight = masked_softmax(block.entity_logits, block.real)
        sentence_frames = weighted_cosine(text.sentence, block.frames, frame_weight, grouped)
        sentence_patches = weighted_cosine(text.sentence, block.entities, entity_weight, grouped)
        if not grouped:
            seen = block.real[None].expand(len(text.sentence), -1, -1)
            words_patches = words_entities(text.words, text.word_mask, text.word_logits, block.entities, seen,
                                           block.entity_logits, self.raw_word_weights)
        else:
            seen, entity_logits = block.real, block.entity_logits
            if text.sentence.ndim == 3:  # each video, its k captions
                seen = seen[:, None].expand(-1, text.sentence.shape[1], -1)
            words_patches = words_entities_grouped(text.words, text.word_mask, text.word_logits, block.entities, seen,
                                                   entity_logits, self.raw_word_weights)
        return {"sentence_frames": sentence_frames, "sentence_patches": sentence_patches, "words_patches": words_patches}


class HVPHead(Head):
    uses_patches = True
    scores_groups = True
    video_side_type = WeightedVideo
    explain_legend = ("frames: the last block's frame weights (from the frames alone), those above uniform framed "
                      "green; under each its patches coloured by the last block's PFCM entity")

    def __init__(self, dim: int, cfg: HVPHeadConfig, depth: int):
        super().__init__()
        layers = tuple(cfg.layers) or default_layers(depth)
        if any(not 0 <= layer < depth for layer in layers) or len(set(layers)) != len(layers):
            raise ValueError(f"model.hvp.layers={list(cfg.layers)}: distinct ViT block indices in [0, {depth - 1}] expected")
        self.vision_layers = tuple(sorted(layers))
        self.matcher = BlockMatcher(dim, cfg)  # one for every block

    @classmethod
    def build(cls, backbone: ClipBackbone, cfg: HVPHeadConfig) -> HVPHead:
        return cls(backbone.embed_dim, cfg, backbone.vision_depth)

    def video_features(
        self, frames: Tensor, frame_mask: Tensor, patches: Tensor | None, layers: list[tuple[Tensor, Tensor]]
    ) -> VideoFeatures:
        """frames: every block's unit frames, the last block's first as other heads' frames are; patches: the
        blocks' entities one after another, E per block."""
        unit = [F.normalize(block_frames.float(), dim=-1) for block_frames, _ in layers]
        compressed = [self.matcher.compress(block_patches, frame_mask) for _, block_patches in layers]
        return VideoFeatures(
            frames=unit[-1],
            frame_mask=frame_mask,
            patches=torch.cat([entities for entities, _ in compressed], dim=1),
            patch_frames=torch.cat([patch_frames for _, patch_frames in compressed], dim=1),
            frame_views=torch.stack(unit[:-1], dim=1) if len(unit) > 1 else no_frame_views(unit[-1]),
        )

    def text_features(self, text: TextFeatures) -> WeightedText:
        """The captions with their word weights' logits, so that reranking weighs each caption's words once."""
        if isinstance(text, WeightedText):
            return text
        words, word_mask = trim_padding(text.words, text.word_mask)
        return WeightedText(text.sentence, words, word_mask, self.matcher.word_weight(words))

    def video_side(self, video: VideoFeatures) -> WeightedVideo:
        """The videos with their frame and entity weights' logits (HVP-Net weighs both from the video alone)."""
        if isinstance(video, WeightedVideo):
            return video
        frame_logits = torch.stack([self.matcher.frame_weight(frames) for frames in self._block_frames(video)], dim=-2)
        fields = {name: getattr(video, name) for name in VideoFeatures.field_names()}
        return WeightedVideo(**fields, frame_logits=frame_logits, entity_logits=self.matcher.patch_weight(video.patches))

    def _block_frames(self, video: VideoFeatures) -> list[Tensor]:
        """Each block's frames [..., T, D], in `vision_layers` order."""
        return [*video.frame_views.unbind(dim=-3), video.frames]

    def _blocks(self, video: WeightedVideo) -> list[Block]:
        """Each block's side of the videos, in `vision_layers` order."""
        per_block = video.patches.shape[-2] // len(self.vision_layers)
        real = video.patch_frames.any(dim=-1)
        return [
            Block(frames, video.frame_logits[..., i, :], video.patches[..., i * per_block : (i + 1) * per_block, :],
                  video.entity_logits[..., i * per_block : (i + 1) * per_block], real[..., i * per_block : (i + 1) * per_block])
            for i, frames in enumerate(self._block_frames(video))
        ]

    def similarities(self, text: TextFeatures, video: VideoFeatures) -> dict[str, Tensor]:
        return self._by_block(text, video, grouped=False)

    def grouped_similarities(self, text: TextFeatures, video: VideoFeatures) -> dict[str, Tensor]:
        return self._by_block(text, video, grouped=True)

    def _by_block(self, text: TextFeatures, video: VideoFeatures, grouped: bool) -> dict[str, Tensor]:
        """Every block's similarities, named by block."""
        text, video = self.text_features(text), self.video_side(video)
        parts = {}
        for layer, block in zip(self.vision_layers, self._blocks(video), strict=True):
            for name, similarity in self.matcher.similarities(text, block, video.frame_mask, grouped).items():
                parts[f"block{layer}_{name}"] = similarity
        return parts

    @torch.no_grad()
    def explain(self, sentence: Tensor, frames: Tensor, patches: Tensor, frame_mask: Tensor) -> dict[str, Tensor]:
        """The last block's part of one pair's score: its frame weights (`frame_scores`, [T]; HVP-Net weighs
        frames by the frames alone, so they are the caption's too), frames weighted above uniform (`kept`), and
        the entity of every patch (`entities` [T, P], numbered per video; -1 on padding frames)."""
        weights = masked_softmax(self.matcher.frame_weight(frames), frame_mask)
        _, assignment, _ = video_entities(self.matcher.pfcm, patches[None], frame_mask[None])
        entities = assignment.view(patches.shape[:2]).masked_fill(~frame_mask[:, None], -1)
        return {"frame_scores": weights, "kept": weights > 1 / frame_mask.sum(), "frame_weights": weights,
                "entities": entities}

    def pair_bytes(self, text: TextFeatures, video: VideoFeatures) -> int:
        words, entities, frames = text.words.shape[1], video.patches.shape[1], video.frames.shape[1]
        per_block = entities // len(self.vision_layers)
        return len(self.vision_layers) * (words_entities_bytes(words, per_block) + FLOAT_BYTES * (2 * frames + 2 * per_block))

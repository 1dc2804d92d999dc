"""Similarity heads: how encoded captions and videos become [Nt, Nv] similarity matrices.

Both heads answer the same questions, so training, scoring and evaluation treat them alike: the
named similarity matrices of a batch (`similarities`; the retrieval score is their sum, the loss an
InfoNCE on each) and how many bytes one (caption, video) pair costs while scoring (`pair_bytes`).
A head with `uses_patches` also says which patch tokens a video keeps (`compress_patches`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hvd.config import ModelConfig
from hvd.model.features import TextFeatures, VideoFeatures
from hvd.model.ffsm import select_frames
from hvd.model.pfcm import PFCM

FLOAT_BYTES = 4


def mean_frame_embedding(frames: Tensor, frame_mask: Tensor) -> Tensor:
    """[B, T, D] unit frame features, [B, T] mask -> [B, D] unit video feature (CLIP4Clip's masked mean pooling)."""
    return F.normalize(torch.einsum("btd,bt->bd", frames, frame_mask.to(frames.dtype)), dim=-1)


def _masked_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    return logits.masked_fill(~mask, -math.inf).softmax(dim=-1)


def no_patches(frames: Tensor) -> tuple[Tensor, Tensor]:
    """Empty entities [B, 0, D] and their frames [B, 0, T], for heads that score without patches."""
    batch, time, dim = frames.shape
    return frames.new_zeros(batch, 0, dim), torch.zeros(batch, 0, time, dtype=torch.bool, device=frames.device)


class MeanPoolHead(nn.Module):
    """The CLIP4Clip meanP baseline: cosine of the sentence and the mean frame feature."""

    uses_patches = False  # encode_video skips the patch tokens altogether

    def similarities(self, text: TextFeatures, video: VideoFeatures) -> dict[str, Tensor]:
        return {"sentence_video": text.sentence @ mean_frame_embedding(video.frames, video.frame_mask).T}

    def pair_bytes(self, text: TextFeatures, video: VideoFeatures) -> int:
        return FLOAT_BYTES


class HVDHead(nn.Module):
    """FFSM picks each pair's frames; PFCM-compressed patches of those frames meet the caption's words.

    PFCM runs once per video, not per pair (`compress_patches`), over each frame's patches on its own
    (`model.pfcm_scope=frame`: clusters never span frames) or over all the video's patches together
    (`video`, as HVP-Net: one entity can span frames). Every entity records the frames its patches came
    from; a pair's word-patch score uses the entities drawn from at least one frame FFSM kept for it. With
    frame scope that is exactly the kept frames compressed on their own, the paper's "patch features of
    the selected frames"; with video scope it is the closest a once-per-video compression comes to it.
    """

    uses_patches = True

    def __init__(self, dim: int, cfg: ModelConfig):
        super().__init__()
        self.frame_keep = cfg.frame_keep
        self.scope = cfg.pfcm_scope
        self.pfcm = PFCM(dim, cfg.pfcm_steps, cfg.pfcm_ratio, cfg.dpc_k)
        # Softmax logits of the query side: words, and patches for the symmetric term. No bias, which
        # the softmax would ignore; zero weights, so training starts from a plain mean.
        self.word_weight = nn.Linear(dim, 1, bias=False)
        self.patch_weight = nn.Linear(dim, 1, bias=False)
        nn.init.zeros_(self.word_weight.weight)
        nn.init.zeros_(self.patch_weight.weight)

    def compress_patches(self, patches: Tensor, frame_mask: Tensor) -> tuple[Tensor, Tensor]:
        """[B, T, P, D] patch features, [B, T] frame mask -> [B, E, D] unit entities and [B, E, T] the frames
        each entity's patches come from."""
        entities, assignment = self._compress(patches, frame_mask)
        batch, time, count, _ = patches.shape
        if self.scope == "frame":  # entity e of frame t is slot t * (E / T) + e
            per_frame = entities.shape[1] // time
            owner = torch.eye(time, dtype=torch.bool, device=patches.device).repeat_interleave(per_frame, dim=0)
            patch_frames = owner[None] & frame_mask[:, None, :]
        else:
            frame_of = torch.arange(time, device=patches.device).repeat_interleave(count).expand(batch, -1)
            spare = entities.shape[1]  # padding patches (assignment -1) land in a column dropped below
            slot = torch.where(assignment >= 0, assignment, spare) * time + frame_of
            flat = torch.zeros(batch, (spare + 1) * time, dtype=torch.bool, device=patches.device)
            patch_frames = flat.scatter_(1, slot, True).view(batch, spare + 1, time)[:, :spare]
        return F.normalize(entities.float(), dim=-1), patch_frames

    def _compress(self, patches: Tensor, frame_mask: Tensor) -> tuple[Tensor, Tensor]:
        """PFCM at the head's scope: [B, E, D] entities and, for video scope, [B, T * P] patch -> entity."""
        batch, time, count, dim = patches.shape
        if self.scope == "frame":  # padding frames are compressed too, and masked through patch_frames
            tokens, _, assignment = self.pfcm(patches.reshape(batch * time, count, dim))
            return tokens.reshape(batch, -1, dim), assignment.reshape(batch, time * count)
        mask = None if bool(frame_mask.all()) else frame_mask.repeat_interleave(count, dim=1)
        tokens, _, assignment = self.pfcm(patches.reshape(batch, time * count, dim), mask)
        return tokens, assignment

    def similarities(self, text: TextFeatures, video: VideoFeatures) -> dict[str, Tensor]:
        kept = select_frames(text.sentence, video.frames, self.frame_keep, video.frame_mask)
        return {
            "sentence_frames": self._sentence_frames(text.sentence, video.frames, kept),
            "words_patches": self._words_patches(text, video, kept),
        }

    @staticmethod
    def _sentence_frames(sentence: Tensor, frames: Tensor, kept: Tensor) -> Tensor:
        """Cosine of the sentence and the mean of the frames kept for the pair."""
        pooled = torch.einsum("tvk,vkd->tvd", kept.to(frames.dtype), frames)
        return torch.einsum("td,tvd->tv", sentence, F.normalize(pooled, dim=-1))

    def _words_patches(self, text: TextFeatures, video: VideoFeatures, kept: Tensor) -> Tensor:
        """Mean of word-to-best-entity and entity-to-best-word similarity over the entities of kept frames."""
        words, word_mask = _trim_padding(text.words, text.word_mask)
        # Padding slots take a copy of the caption's first word: a duplicate leaves every max over words
        # unchanged and gets no word weight, so the big similarity tensor needs no mask of its own.
        first = word_mask.to(torch.uint8).argmax(dim=1)
        words = torch.where(
            word_mask[..., None], words, words[torch.arange(len(words), device=words.device), first][:, None]
        )
        count, entities, dim = video.patches.shape
        seen = torch.einsum("tvk,vek->tve", kept.float(), video.patch_frames.float()) > 0  # [Nt, Nv, E]
        similarity = (words.flatten(0, 1) @ video.patches.reshape(-1, dim).T).view(
            len(words), words.shape[1], count, entities
        )  # [Nt, L, Nv, E], one matrix product, no layout copy

        best_patch = similarity.masked_fill(~seen[:, None], -math.inf).amax(dim=-1)  # [Nt, L, Nv]
        word_weight = _masked_softmax(self.word_weight(words).squeeze(-1), word_mask)
        text_to_video = torch.einsum("tlv,tl->tv", best_patch, word_weight)

        best_word = similarity.amax(dim=1)  # [Nt, Nv, E]
        patch_logits = self.patch_weight(video.patches).squeeze(-1)  # [Nv, E]
        patch_weight = _masked_softmax(patch_logits.expand_as(best_word), seen)
        video_to_text = (best_word * patch_weight).sum(dim=-1)
        return (text_to_video + video_to_text) / 2

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
        # word-entity similarities and their masked copy; entity-side masks and reductions; kept-frame mean
        return FLOAT_BYTES * (2 * words * entities + 2 * words + 6 * entities + frames + 2 * dim)


def _trim_padding(words: Tensor, word_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Drop the trailing word slots that are padding in every caption of the batch."""
    length = int(word_mask.any(dim=0).nonzero().max()) + 1
    return words[:, :length], word_mask[:, :length]

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


def mean_frame_embedding(frames: Tensor) -> Tensor:
    """[B, T, D] unit frame features -> [B, D] unit video feature (CLIP4Clip mean pooling)."""
    return F.normalize(frames.mean(dim=1), dim=-1)


def _masked_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    return logits.masked_fill(~mask, -math.inf).softmax(dim=-1)


class MeanPoolHead(nn.Module):
    """The CLIP4Clip meanP baseline: cosine of the sentence and the mean frame feature."""

    uses_patches = False  # encode_video skips the patch tokens altogether

    def similarities(self, text: TextFeatures, video: VideoFeatures) -> dict[str, Tensor]:
        return {"sentence_video": text.sentence @ mean_frame_embedding(video.frames).T}

    def pair_bytes(self, text: TextFeatures, video: VideoFeatures) -> int:
        return FLOAT_BYTES


class HVDHead(nn.Module):
    """FFSM picks each pair's frames; PFCM-compressed patches of those frames meet the caption's words.

    PFCM clusters each frame's patches on its own (clusters never span frames; the paper compresses
    "the patch features of the selected frames" and leaves this open). Then compressing the frames FFSM
    kept for a pair is exactly the kept frames' share of the whole video compressed once, so
    `compress_patches` runs once per video and `similarities` only masks, per pair, the frames FFSM
    dropped: per-pair work is a matrix product and masked maxima instead of a PFCM run.
    """

    uses_patches = True

    def __init__(self, dim: int, cfg: ModelConfig):
        super().__init__()
        self.frame_keep = cfg.frame_keep
        self.pfcm = PFCM(dim, cfg.pfcm_steps, cfg.pfcm_ratio, cfg.dpc_k)
        # Softmax logits of the query side: words, and patches for the symmetric term. No bias, which
        # the softmax would ignore; zero weights, so training starts from a plain mean.
        self.word_weight = nn.Linear(dim, 1, bias=False)
        self.patch_weight = nn.Linear(dim, 1, bias=False)
        nn.init.zeros_(self.word_weight.weight)
        nn.init.zeros_(self.patch_weight.weight)

    def compress_patches(self, patches: Tensor) -> Tensor:
        """[B, T, P, D] patch features -> [B, T, P', D] unit entity features, P' = P * ratio ** steps."""
        batch, frames, count, dim = patches.shape
        tokens, _ = self.pfcm(patches.reshape(batch * frames, count, dim))
        return F.normalize(tokens.float(), dim=-1).reshape(batch, frames, -1, dim)

    def similarities(self, text: TextFeatures, video: VideoFeatures) -> dict[str, Tensor]:
        kept = select_frames(text.sentence, video.frames, self.frame_keep)
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
        """Mean of word-to-best-patch and patch-to-best-word similarity over the kept frames' patches."""
        words, word_mask = _trim_padding(text.words, text.word_mask)
        # Padding slots take a copy of the caption's first word: a duplicate leaves every max over words
        # unchanged and gets no word weight, so the big similarity tensor needs no mask of its own.
        first = word_mask.to(torch.uint8).argmax(dim=1)
        words = torch.where(
            word_mask[..., None], words, words[torch.arange(len(words), device=words.device), first][:, None]
        )
        count, frames, patches, dim = video.patches.shape
        similarity = (words.flatten(0, 1) @ video.patches.reshape(-1, dim).T).view(
            len(words), words.shape[1], count, frames, patches
        )  # [Nt, L, Nv, T, P], one matrix product, no layout copy

        best_patch = (
            similarity.amax(dim=-1).masked_fill(~kept[:, None], -math.inf).amax(dim=-1)
        )  # [Nt, L, Nv]
        word_weight = _masked_softmax(self.word_weight(words).squeeze(-1), word_mask)
        text_to_video = torch.einsum("tlv,tl->tv", best_patch, word_weight)

        best_word = similarity.amax(dim=1).flatten(2)  # [Nt, Nv, T * P]
        patch_logits = self.patch_weight(video.patches).squeeze(-1).flatten(1)  # [Nv, T * P]
        patch_weight = _masked_softmax(
            patch_logits.expand_as(best_word), kept.repeat_interleave(patches, dim=-1)
        )
        video_to_text = (best_word * patch_weight).sum(dim=-1)
        return (text_to_video + video_to_text) / 2

    @torch.no_grad()
    def explain(self, sentence: Tensor, frames: Tensor, patches: Tensor) -> dict[str, Tensor]:
        """What one (caption, video) pair's score looks at, for the evaluation report's pictures.

        sentence [D] and frames [T, D]: unit features; patches [T, P, D]: the backbone's patch tokens
        before PFCM. Returns FFSM's caption-frame cosines `frame_scores` [T] and `kept` frames [T], and
        `entities` [T, P], the PFCM output token each patch was merged into (clusters never span frames).
        """
        kept = select_frames(sentence[None], frames[None], self.frame_keep)[0, 0]
        entities = self.pfcm.entity_assignment(patches)
        return {"frame_scores": frames @ sentence, "kept": kept, "entities": entities}

    def pair_bytes(self, text: TextFeatures, video: VideoFeatures) -> int:
        words, (frames, patches, dim) = text.words.shape[1], video.patches.shape[1:]
        # word-patch similarities and their per-frame maxima; patch-side reductions; kept-frame mean
        return FLOAT_BYTES * (words * frames * patches + 2 * words * frames + 4 * frames * patches + 2 * dim)


def _trim_padding(words: Tensor, word_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Drop the trailing word slots that are padding in every caption of the batch."""
    length = int(word_mask.any(dim=0).nonzero().max()) + 1
    return words[:, :length], word_mask[:, :length]

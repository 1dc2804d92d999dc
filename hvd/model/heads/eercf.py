"""EERCF (Tian et al., AAAI 2024): coarse-to-fine visual features, a parameter-free text-gated interaction
block, a Pearson constraint, and two-stage retrieval.

Per video, as EERCF's code computes them: a temporal transformer over the frame features (with learned
frame positions and a residual to the CLIP frames; its blocks start as copies of CLIP's first text
blocks, as CLIP4Clip's seqTransf does), whose masked mean is the coarse video feature; the CLIP frames;
and every patch of every frame. Per pair, the text-gated interaction block (TIB), four similarities:
- coarse: sentence x W x video (W starts as the identity);
- frames, patches: softmax-pooled (temperature 0.01) sentence-frame and sentence-patch similarities;
- strong: the contextualised frames gated by the caption (softmax of sentence-frame similarity at
  temperature 0.1, detached as in EERCF's code: the gate passes no gradient) into one feature per pair,
  compared with the sentence.
The loss is EERCF's: InfoNCE on the weak sum 0.5 coarse + 0.5 frames + 0.05 patches (weight 0.8) and on
the strong score (0.2), plus the Pearson constraint: text and video features standardised over the gathered
batch, and the squared distance of each dimension's correlation from 1, summed (EERCF's 0.14 on the
diagonal, 0 off it), on the video-level and the gated frame-level features, times
`model.eercf.pearson_weight` (EERCF's 0.001).
The retrieval score is EERCF's rerank score, with its own weights, not the loss's: 0.5 coarse + 0.8 frames
+ 0.2 patches + 0.2 strong (`EVAL_WEIGHTS`). EERCF's protocol ranks every video by the coarse score and
reranks its top 50 by that score: `eval.mode=two_stage eval.topk=50` (stage 1 `text_embedding` .
`video_embedding`, stage 2 the full score); `eval.mode=exhaustive` ranks every pair by the rerank score.

Departures (docs/heads.md, "Departures from the references"): the strong score gates each video by the
query's own caption in training as at evaluation (EERCF's training gates each video by its paired caption
only); EERCF's per-frame-slot weight matrix (eye(max_frames)) is left out, as it ties the model to one frame
count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip import CLIP
from open_clip.transformer import Transformer
from torch import Tensor, nn

from hvd.config import EERCFHeadConfig
from hvd.model.backbone import ClipBackbone
from hvd.model.features import TextFeatures, VideoFeatures
from hvd.model.heads.base import FLOAT_BYTES, Head, masked_softmax
from hvd.model.losses import symmetric_infonce
from hvd.model.temporal import FrameTransformer

WEAK_TEMPERATURE = 0.01
STRONG_TEMPERATURE = 0.1
WEAK = {"coarse": 0.5, "frames": 0.5, "patches": 0.05}  # EERCF's weights inside the weak score (training)
LOSS_WEIGHTS = {"weak": 0.8, "strong": 0.2}  # EERCF's weak_loss_weight, strong_loss_weight
# EERCF's rerank at evaluation: 0.8 weak frames + 0.2 strong frames + 0.2 weak patches + 0.5 coarse
EVAL_WEIGHTS = {"coarse": 0.5, "frames": 0.8, "patches": 0.2, "strong": 0.2}
PEARSON_DIAGONAL = 0.14


def pearson_constraint(text: Tensor, video: Tensor) -> Tensor:
    """sum over dimensions of (corr(text_d, video_d) - 1)^2 over the batch, times EERCF's 0.14; corr as EERCF
    computes it (unbiased std, then a mean over the batch: (B - 1) / B for a perfect correlation)."""
    standard = [(x - x.mean(dim=0)) / x.std(dim=0) for x in (text.float(), video.float())]
    correlation = (standard[0] * standard[1]).sum(dim=0) / len(text)  # the diagonal of z_t^T z_v / B
    return PEARSON_DIAGONAL * (correlation - 1).pow(2).sum()


class EERCFHead(Head):
    scores_groups = True
    stage1_is_mean_frame = False  # its own coarse embeddings
    uses_patches = True
    score_weights = EVAL_WEIGHTS
    explain_legend = ("frames: EERCF's text gate (softmax of caption-frame cosine / 0.1); frames gated above a "
                      "uniform weight framed green")

    def __init__(self, dim: int, cfg: EERCFHeadConfig, text: Transformer, max_frames: int):
        super().__init__()
        self.pearson_weight = cfg.pearson_weight
        self.temporal = FrameTransformer(dim, cfg.temporal_layers, text, max_frames)
        self.coarse_weight = nn.Parameter(torch.eye(dim))

    @classmethod
    def build(cls, backbone: ClipBackbone, cfg: EERCFHeadConfig) -> EERCFHead:
        return cls(backbone.embed_dim, cfg, backbone.clip.transformer, backbone.context_length)

    def init_from_clip(self, clip: CLIP) -> None:
        self.temporal.init_from_clip(clip)

    def video_features(
        self, frames: Tensor, frame_mask: Tensor, patches: Tensor | None, layers: list[tuple[Tensor, Tensor]]
    ) -> VideoFeatures:
        batch, time, count, dim = patches.shape
        context = F.normalize(self.temporal(frames, frame_mask).float(), dim=-1)
        frame_of_patch = torch.eye(time, dtype=torch.bool, device=frames.device).repeat_interleave(count, dim=0)
        return VideoFeatures(
            frames=F.normalize(frames.float(), dim=-1),
            frame_mask=frame_mask,
            patches=F.normalize(patches.float(), dim=-1).reshape(batch, time * count, dim),
            patch_frames=frame_of_patch[None] & frame_mask[:, None, :],  # [B, T * P, T]: its own frame, if real
            frame_views=context[:, None],
        )

    def coarse_video(self, video: VideoFeatures) -> Tensor:
        """[Nv, D] unit video-level feature: the masked mean of the contextualised frames."""
        context = video.frame_views[:, 0]
        return F.normalize(torch.einsum("btd,bt->bd", context, video.frame_mask.to(context.dtype)), dim=-1)

    def text_embedding(self, text: TextFeatures) -> Tensor:
        return text.sentence @ self.coarse_weight

    def video_embedding(self, video: VideoFeatures) -> Tensor:
        return self.coarse_video(video)

    def gated_frames(self, sentence: Tensor, video: VideoFeatures) -> Tensor:
        """[Nt, Nv, D] the TIB's strong feature: contextualised frames weighted by their cosine to the caption
        (the gate detached, as EERCF's)."""
        context = video.frame_views[:, 0]
        gate = self._gate(torch.einsum("td,vkd->tvk", sentence, video.frames), video.frame_mask)
        return F.normalize(torch.einsum("tvk,vkd->tvd", gate, context), dim=-1)

    def similarities(self, text: TextFeatures, video: VideoFeatures) -> dict[str, Tensor]:
        sentence = text.sentence
        coarse = (sentence @ self.coarse_weight) @ self.coarse_video(video).T
        frames = self._softmax_pooled(torch.einsum("td,vkd->tvk", sentence, video.frames), video.frame_mask)
        count, slots, dim = video.patches.shape
        patches = self._softmax_pooled((sentence @ video.patches.reshape(-1, dim).T).view(len(sentence), count, slots),
                                       video.patch_frames.any(dim=-1))
        strong = torch.einsum("td,tvd->tv", sentence, self.gated_frames(sentence, video))
        return {"coarse": coarse, "frames": frames, "patches": patches, "strong": strong}

    def pair_similarities(self, text: TextFeatures, video: VideoFeatures) -> dict[str, Tensor]:
        sentence, context = text.sentence, video.frame_views[:, 0]
        coarse = ((sentence @ self.coarse_weight) * self.coarse_video(video)).sum(dim=-1)
        frame_cosine = torch.einsum("pd,ptd->pt", sentence, video.frames)
        frames = self._softmax_pooled(frame_cosine, video.frame_mask)
        patches = self._softmax_pooled(torch.einsum("pd,ped->pe", sentence, video.patches), video.patch_frames.any(dim=-1))
        gate = self._gate(frame_cosine, video.frame_mask)
        strong = (sentence * F.normalize(torch.einsum("pt,ptd->pd", gate, context), dim=-1)).sum(dim=-1)
        return {"coarse": coarse, "frames": frames, "patches": patches, "strong": strong}

    @staticmethod
    def _gate(frame_cosine: Tensor, frame_mask: Tensor) -> Tensor:
        """The TIB's frame gate, softmax(cosine / 0.1) over the real frames, detached as in EERCF's code."""
        return masked_softmax(frame_cosine.detach() / STRONG_TEMPERATURE, frame_mask)

    def contrastive_losses(self, text: TextFeatures, video: VideoFeatures, similarities: dict[str, Tensor],
                           scale: Tensor) -> dict[str, Tensor]:
        """EERCF's: the InfoNCE of the weak sum and of the strong score, weighted 0.8 and 0.2."""
        weak = sum(weight * similarities[name] for name, weight in WEAK.items())
        return {name: LOSS_WEIGHTS[name] * symmetric_infonce(scale * s)
                for name, s in (("weak", weak), ("strong", similarities["strong"]))}

    @staticmethod
    def _softmax_pooled(similarity: Tensor, mask: Tensor) -> Tensor:
        """sum_k s_k softmax(s / 0.01)_k over the valid slots: close to the best slot's similarity."""
        weights = masked_softmax(similarity / WEAK_TEMPERATURE, mask.expand_as(similarity))
        return (similarity.masked_fill(~mask, 0.0) * weights).sum(dim=-1)

    def regularizers(self, text: TextFeatures, video: VideoFeatures) -> dict[str, Tensor]:
        if self.pearson_weight == 0 or len(text) < 2:
            return {}
        own = torch.arange(len(text), device=text.sentence.device)
        gated = self.gated_frames(text.sentence, video)[own, own]  # each video gated by its own caption
        constraint = pearson_constraint(text.sentence, self.coarse_video(video)) + pearson_constraint(text.sentence, gated)
        return {"pearson": self.pearson_weight * constraint}

    @torch.no_grad()
    def explain(self, sentence: Tensor, frames: Tensor, patches: Tensor, frame_mask: Tensor) -> dict[str, Tensor]:
        """One pair's TIB gate over the frames (`frame_scores`, [T]); frames gated above uniform are `kept`."""
        gate = masked_softmax(frames @ sentence / STRONG_TEMPERATURE, frame_mask)
        return {"frame_scores": gate, "kept": gate > 1 / frame_mask.sum(), "frame_weights": gate}

    def pair_bytes(self, text: TextFeatures, video: VideoFeatures) -> int:
        frames, dim = video.frames.shape[1:]
        patches = video.patches.shape[1]
        return FLOAT_BYTES * (4 * patches + 4 * frames + 3 * dim)

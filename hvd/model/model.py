"""The retrieval model: a CLIP backbone and a similarity head behind one encode / score / loss interface."""

from __future__ import annotations

import contextlib
import math

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hvd.model.backbone import PAD_TOKEN, ClipBackbone
from hvd.model.features import TextFeatures, VideoFeatures
from hvd.model.first_stage import FirstStage
from hvd.model.heads import Head
from hvd.model.losses import gather_across_ranks
from hvd.runtime.progress import Progress

MAX_LOGIT_SCALE = 100.0
IMAGE_MEAN: tuple[float, float, float] = open_clip.OPENAI_DATASET_MEAN  # CLIP's pixel statistics
IMAGE_STD: tuple[float, float, float] = open_clip.OPENAI_DATASET_STD


# Reranking gathers every candidate's features per chunk; chunks this small stay in cache: on a 2-core VM,
# 10k videos x 200 captions, top 50 both ways, 16-32 MB chunks took 7.1-9.1 s against 12.3-17.1 s at 64-512 MB.
RERANK_CHUNK_BYTES = 32 << 20
VIDEO_SIDE_CHUNK = 1024  # videos per `Head.video_side` call: HVP-Net's weight MLPs hold [videos, tokens, D] at once


class RetrievalModel(nn.Module):
    def __init__(self, backbone: ClipBackbone, head: Head, score_budget_mb: int, first_stage: FirstStage | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.first_stage = first_stage  # None: stage 1 is the head's own embeddings, untrained for it
        self.score_budget_bytes = score_budget_mb * 2**20
        self.cuda_dtype: torch.dtype | None = torch.bfloat16  # the encoders' autocast on CUDA (train.precision)
        # Buffers, not parameters: they follow the model to its device and stay out of the state dict.
        self.register_buffer("image_mean", torch.tensor(IMAGE_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(IMAGE_STD).view(3, 1, 1), persistent=False)

    @property
    def image_size(self) -> int:
        return self.backbone.image_size

    @property
    def device(self) -> torch.device:
        return self.backbone.logit_scale.device

    def _autocast(self) -> contextlib.AbstractContextManager:
        """Encoders run in `cuda_dtype` on CUDA (bf16 unless training set it); on CPU in the caller's precision
        (fp32 unless it opened autocast)."""
        if self.device.type == "cuda" and self.cuda_dtype is not None:
            return torch.autocast("cuda", dtype=self.cuda_dtype)
        return contextlib.nullcontext()

    def logit_scale(self) -> Tensor:
        return self.backbone.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def encode_text(self, tokens: Tensor) -> TextFeatures:
        """Token ids [B, L] from `build_tokenizer` -> unit sentence and word features."""
        tokens = tokens.to(self.device)
        with self._autocast():
            sentence, words = self.backbone.encode_text(tokens)
        return TextFeatures(
            sentence=F.normalize(sentence.float(), dim=-1),
            words=F.normalize(words.float(), dim=-1),
            word_mask=tokens != PAD_TOKEN,
        )

    def encode_video(self, frames: Tensor, frame_mask: Tensor | None = None) -> VideoFeatures:
        """Normalised frames [B, T, 3, H, W] and their mask [B, T] (False on padding; None: no padding)
        -> unit frame features and the head's entities."""
        if frames.ndim != 5 or not frames.is_floating_point():
            raise ValueError(
                "frames must be normalised floats [batch, time, 3, height, width], "
                f"got {frames.dtype} {list(frames.shape)}"
            )
        batch, time = frames.shape[:2]
        if frame_mask is None:
            frame_mask = torch.ones(batch, time, dtype=torch.bool, device=self.device)
        elif frame_mask.shape != (batch, time) or not bool(frame_mask.any(dim=1).all()):
            raise ValueError(f"frame_mask must be bool [{batch}, {time}] with a valid frame per video, got {list(frame_mask.shape)}")
        frame_mask = frame_mask.to(self.device, torch.bool)
        head = self.head
        with self._autocast():
            pooled, patches, blocks = self.backbone.encode_images(
                frames.to(self.device).flatten(0, 1), with_patches=head.uses_patches, layers=head.vision_layers
            )
            per_video = lambda x: x.unflatten(0, (batch, time))  # noqa: E731
            return head.video_features(
                per_video(pooled), frame_mask, None if patches is None else per_video(patches),
                [(per_video(f), per_video(p)) for f, p in blocks],
            )

    def normalize_frames(self, frames: Tensor) -> Tensor:
        """uint8 frames [B, T, H, W, 3], as shards store them -> the model's input [B, T, 3, H, W], on its device.

        Only uint8 crosses to the device (a quarter of float32's bytes); scaling and CLIP's mean and std
        run there.
        """
        if frames.dtype != torch.uint8 or frames.ndim != 5 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 [batch, time, height, width, 3], got {frames.dtype} {list(frames.shape)}")
        pixels = frames.to(self.device, non_blocking=True).permute(0, 1, 4, 2, 3).float().div_(255.0)
        return (pixels - self.image_mean) / self.image_std

    def encode_batch(self, tokens: Tensor, frames: Tensor, frame_mask: Tensor) -> tuple[TextFeatures, VideoFeatures]:
        """A training batch's features from token ids [B, L], uint8 frames [B, T, H, W, 3] and their mask [B, T]."""
        video = self.encode_video(self.normalize_frames(frames), frame_mask)
        return self.encode_text(tokens), video

    def forward(self, tokens: Tensor, frames: Tensor, frame_mask: Tensor) -> tuple[Tensor, dict[str, float]]:
        """One training step's loss, `encode_batch`'s inputs.

        The call DistributedDataParallel wraps: its gradient all-reduce overlaps this step's backward.
        """
        return self.loss(*self.encode_batch(tokens, frames, frame_mask))

    def similarities(self, text: TextFeatures, video: VideoFeatures) -> dict[str, Tensor]:
        """The head's named [Nt, Nv] similarity matrices, with gradients, in one piece.

        In the features' fp32 even on CUDA: close scores must not tie in bf16 when ranking thousands of videos.
        """
        return self.head.similarities(text, video)

    @torch.no_grad()
    def score(self, text: TextFeatures, video: VideoFeatures, progress: Progress | None = None) -> Tensor:
        """Retrieval scores [Nt, Nv] on the features' device, computed on the model's device in chunks
        of at most `score_budget_mb` of intermediates; `progress` counts the pairs scored."""
        text_chunk, video_chunk = self.chunk_sizes(text, video)
        scores = torch.empty(len(text), len(video), device=text.device)
        for t in range(0, len(text), text_chunk):
            texts = self.head.text_features(text[t : t + text_chunk].to(self.device))  # once for all video chunks
            for v in range(0, len(video), video_chunk):
                chunk = self.similarities(texts, video[v : v + video_chunk].to(self.device))
                combined = self.combine(chunk)
                scores[t : t + text_chunk, v : v + video_chunk] = combined.to(scores.device)
                if progress is not None:
                    progress.advance(combined.numel())
        return scores

    @torch.no_grad()
    def score_groups(self, text: TextFeatures, video: VideoFeatures, candidates: Tensor, videos_of_text: bool) -> Tensor:
        """[Q, k] scores of each query with its own candidates (`candidates` [Q, k] indices): each caption with
        videos, or with `videos_of_text` False each video with captions; in chunks of queries within
        `score_budget_mb`. Needs a head that `scores_groups`. The head's caption-side work runs once per caption
        (`Head.text_features`), not once per candidate; its video-side work likewise where `video` comes
        derived (`video_side`), else once per (query, candidate) pair."""
        scores = torch.empty(candidates.shape, device=text.device)
        text = self.head.text_features(text.to(self.device))
        queries, fixed = (text, video) if videos_of_text else (video, text)
        per_query = candidates.shape[1] * (self.head.pair_bytes(text, video) + fixed.row_bytes()) + queries.row_bytes()
        chunk = max(1, min(self.score_budget_bytes, RERANK_CHUNK_BYTES) // per_query)
        for start in range(0, len(candidates), chunk):
            rows = slice(start, start + chunk)
            own, theirs = queries[rows].to(self.device), fixed[candidates[rows]].to(self.device)  # [q], [q, k]
            pair = (own, theirs) if videos_of_text else (theirs, own)
            scores[rows] = self.combine(self.head.grouped_similarities(*pair)).to(scores.device)
        return scores

    @torch.no_grad()
    def video_side(self, video: VideoFeatures) -> VideoFeatures:
        """`video` with what the head derives from videos alone (`Head.video_side`), VIDEO_SIDE_CHUNK videos at a
        time on the model's device, back on `video`'s: for reranking, where one video meets many captions.
        Unchanged where the head derives nothing or `video` comes derived (a gallery index built for the head)."""
        if self.head.video_side_type is VideoFeatures or isinstance(video, self.head.video_side_type):
            return video
        return self.head.video_side_type.cat([
            self.head.video_side(video[start : start + VIDEO_SIDE_CHUNK].to(self.device)).to(video.device)
            for start in range(0, len(video), VIDEO_SIDE_CHUNK)
        ])

    def chunk_sizes(self, text: TextFeatures, video: VideoFeatures) -> tuple[int, int]:
        """Captions and videos per scoring chunk: as square as the budget and the inputs allow."""
        pairs = max(1, self.score_budget_bytes // self.head.pair_bytes(text, video))
        text_chunk = max(1, min(len(text), math.isqrt(pairs)))
        video_chunk = max(1, min(len(video), pairs // text_chunk))
        text_chunk = max(1, min(len(text), pairs // video_chunk))  # give back what few videos left over
        return text_chunk, video_chunk

    def combine(self, similarities: dict[str, Tensor]) -> Tensor:
        """The retrieval score: the head's similarities summed, each with its score weight (by default its loss
        weight; absent: 1)."""
        weights = self.head.part_weights if self.head.score_weights is None else self.head.score_weights
        return sum(weights.get(name, 1.0) * s for name, s in similarities.items())

    @torch.no_grad()
    def text_embeddings(self, text: TextFeatures) -> Tensor:
        """[Nt, D]: captions' side of the cheap first stage: the head's (meanP's by default), through the
        trained first stage when the model has one."""
        embedding = self.head.text_embedding(text)
        return embedding if self.first_stage is None else self.first_stage.embed_text(embedding)

    @torch.no_grad()
    def video_embeddings(self, video: VideoFeatures) -> Tensor:
        """[Nv, D]: videos' side of the first stage; its dot product with `text_embeddings` ranks them."""
        embedding = self.head.video_embedding(video)
        return embedding if self.first_stage is None else self.first_stage.embed_video(embedding)

    def require_mean_frame_stage1(self) -> None:
        """Frame embeddings (`eval.shortlist`) mean something only where the stage-1 video embedding is the mean
        frame; refused for heads with their own (EERCF, HCMI)."""
        if not self.head.stage1_is_mean_frame:
            raise ValueError(f"{type(self.head).__name__}: its stage-1 video embedding is its own, not the mean frame, "
                             "so stage 1 cannot score its frames: set eval.shortlist=0")

    @torch.no_grad()
    def frame_embeddings(self, video: VideoFeatures) -> Tensor:
        """[Nv, T, D]: each frame through the first stage's video map (unit length; padding frames too, see
        `video.frame_mask`). The map is linear, so the frames' mean is the mean-frame embedding before normalising;
        a caption's cosines with one video's frames see a short event the mean dilutes."""
        self.require_mean_frame_stage1()
        frames = video.frames.float()
        return F.normalize(frames, dim=-1) if self.first_stage is None else self.first_stage.embed_video(frames)

    def global_embeddings(self, text: TextFeatures, video: VideoFeatures) -> tuple[Tensor, Tensor]:
        """Both sides of the first stage at once."""
        return self.text_embeddings(text), self.video_embeddings(video)

    def loss(self, text: TextFeatures, video: VideoFeatures) -> tuple[Tensor, dict[str, float]]:
        """The head's contrastive loss on each similarity (by default a weighted symmetric InfoNCE) plus its
        regularizers, and the trained first stage's term, over the batch gathered from all ranks."""
        text, video = gather_across_ranks(text), gather_across_ranks(video)
        scale = self.logit_scale()
        similarities = self.similarities(text, video)
        parts = self.head.contrastive_losses(text, video, similarities, scale)
        parts |= self.head.regularizers(text, video)
        if self.first_stage is not None:
            parts["first_stage"] = self.first_stage.loss(
                self.head.text_embedding(text), self.head.video_embedding(video), self.combine(similarities), scale
            )
        total = torch.stack(list(parts.values())).sum()
        metrics = {f"loss_{name}": float(value.detach()) for name, value in parts.items()}
        metrics["logit_scale"] = float(scale.detach())
        return total, metrics

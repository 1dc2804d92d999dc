"""A transformer over a video's frame features: how EERCF and HCMI let frames see each other.

As CLIP4Clip's seqTransf: learned frame positions added to the frames, CLIP-style residual blocks with
padding frames masked out as keys, and the input added back. Its blocks start as copies of CLIP's first
text blocks and its positions as CLIP's first text positions (`init_from_clip`) when widths match, so a
warm-started model starts near the plain frames.
"""

from __future__ import annotations

import copy

import torch
from open_clip import CLIP
from open_clip.transformer import Transformer
from torch import Tensor, nn


class FrameTransformer(nn.Module):
    def __init__(self, dim: int, layers: int, text: Transformer, max_frames: int):
        super().__init__()
        if text.width == dim:  # copies of CLIP's first text blocks, seeded by `init_from_clip`
            self.blocks = nn.ModuleList(copy.deepcopy(block) for block in text.resblocks[:layers])
        else:
            self.blocks = Transformer(dim, layers, max(1, dim // 64)).resblocks
        self.positions = nn.Parameter(torch.randn(max_frames, dim) * 0.01)

    def init_from_clip(self, clip: CLIP) -> None:
        if clip.transformer.width != self.positions.shape[1]:
            return
        with torch.no_grad():
            for block, source in zip(self.blocks, clip.transformer.resblocks, strict=False):
                block.load_state_dict(source.state_dict())
            self.positions.copy_(clip.positional_embedding[: len(self.positions)])

    def forward(self, frames: Tensor, frame_mask: Tensor) -> Tensor:
        """[B, T, D] frames, [B, T] mask -> [B, T, D] frames that have attended to the clip's real frames,
        plus the input (the residual of CLIP4Clip's seqTransf). Not normalised."""
        batch, time, _ = frames.shape
        if time > len(self.positions):
            raise ValueError(f"the frame transformer takes at most {len(self.positions)} frames, got {time}")
        x = frames + self.positions[:time].to(frames.dtype)
        heads = self.blocks[0].attn.num_heads
        blocked = torch.zeros(batch, 1, time, dtype=x.dtype, device=x.device).masked_fill(~frame_mask[:, None], float("-inf"))
        mask = blocked.expand(batch, time, time).repeat_interleave(heads, dim=0)  # [B * heads, T, T]
        for block in self.blocks:
            x = block(x, attn_mask=mask)
        return x + frames

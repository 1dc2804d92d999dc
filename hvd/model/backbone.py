"""open_clip's CLIP, read out token by token in the joint embedding space.

CLIP itself returns one vector per image and per caption. HVD also needs every word and every
patch, projected like the pooled vectors so that words and patches are comparable: words go
through `ln_final` and `text_projection`, patches through `ln_post` and `proj`, as in CLIP4Clip.
"""

from __future__ import annotations

import torch
from open_clip import CLIP
from torch import Tensor, nn

PAD_TOKEN = 0  # open_clip's tokenizer pads with 0; start and end tokens are real words


class ClipBackbone(nn.Module):
    def __init__(self, clip: CLIP):
        super().__init__()
        self.clip = clip
        self.clip.visual.output_tokens = True

    @property
    def image_size(self) -> int:
        return int(self.clip.visual.image_size[0])

    @property
    def context_length(self) -> int:
        return int(self.clip.context_length)

    @property
    def embed_dim(self) -> int:
        return int(self.clip.visual.output_dim)

    @property
    def vision_depth(self) -> int:
        return len(self.clip.visual.transformer.resblocks)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    def checkpoint_vision(self, enable: bool) -> None:
        """Recompute the vision tower's blocks in backward instead of keeping their activations (frames x batch
        of them): less memory, about one more forward of the tower's compute."""
        self.clip.visual.set_grad_checkpointing(enable)

    def encode_text(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Sentence features [B, D] (end-of-text token) and word features [B, L, D] (every token)."""
        if tokens.ndim != 2 or not 0 < tokens.shape[1] <= self.context_length:
            raise ValueError(
                f"text tokens must be [batch, length <= {self.context_length}], got {list(tokens.shape)}"
            )
        if not bool((tokens != PAD_TOKEN).any(dim=1).all()):
            raise ValueError("every caption needs at least one token that is not padding")
        length = tokens.shape[1]
        clip = self.clip
        x = clip.token_embedding(tokens).to(clip.transformer.get_cast_dtype())
        x = x + clip.positional_embedding[:length].to(x.dtype)
        x = clip.transformer(x, attn_mask=clip.attn_mask[:length, :length])
        words = clip.ln_final(x) @ clip.text_projection
        # The end-of-text token has the largest id; the causal mask makes it a summary of the caption.
        sentence = words[torch.arange(words.shape[0], device=words.device), tokens.argmax(dim=-1)]
        return sentence, words

    def encode_images(
        self, images: Tensor, with_patches: bool, layers: tuple[int, ...] = ()
    ) -> tuple[Tensor, Tensor | None, list[tuple[Tensor, Tensor]]]:
        """Image features [N, D] (class token), if asked patch features [N, P, D], and for each ViT block in
        `layers` that block's (class [N, D], patches [N, P, D]) through the same ln_post and projection."""
        size = self.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(
                f"frames must be [N, 3, {size}, {size}] for this preset, got {list(images.shape)}"
            )
        visual = self.clip.visual
        if layers:
            out = visual.forward_intermediates(images, indices=list(layers), normalize_intermediates=True,
                                               output_fmt="NLC", output_extra_tokens=True)
            blocks = [(prefix[:, 0] @ visual.proj, tokens @ visual.proj)
                      for prefix, tokens in zip(out["image_intermediates_prefix"], out["image_intermediates"], strict=True)]
            return out["image_features"], None, blocks
        pooled, tokens = visual(images)
        return pooled, tokens @ visual.proj if with_patches else None, []

"""A step's gradient in one pass, or the same gradient in micro-batches with cached feature gradients.

A contrastive loss couples every caption with every video of the batch, so plain gradient accumulation over
micro-batches would train on smaller batches: fewer negatives, another loss. Gradient caching (Gao et al. 2021,
"Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup") keeps the whole batch's loss: encode
every micro-batch without a graph, take the loss on the detached features, then encode each micro-batch again
with its graph and backpropagate the features' cached gradients. The result is the whole batch's gradient
(tests/test_gradients.py) with a micro-batch's activations, for a second forward pass of the encoders; large
effective batches (EERCF's recipe uses 240) fit where one pass would not.

DistributedDataParallel cannot follow the two passes (its all-reduce fires during one forward's backward), so a
micro-batched model is not wrapped: `average_across_ranks` does DDP's averaging once, after the last micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from hvd.model import RetrievalModel
from hvd.model.features import Features


def _with_grad(features: Features) -> Features:
    """Detached copies of the float fields as leaves that collect the loss's gradient; masks as they are."""
    return features.map(lambda t: t.detach().requires_grad_() if t.is_floating_point() else t)


def _backward_cached(encoded: Features, cached: Features, rows: slice) -> tuple[list[Tensor], list[Tensor]]:
    """The (output, gradient) pairs that carry the cached gradient of `rows` into `encoded`'s graph; a field the
    concatenation padded (words, entities: `Features.cat(pad=True)`) takes its own length of it."""
    outputs, grads = [], []
    for name in encoded.field_names():
        leaf, output = getattr(cached, name), getattr(encoded, name)
        if leaf.grad is not None and output.requires_grad:
            grad = leaf.grad[rows]
            outputs.append(output)
            grads.append(grad[:, : output.shape[1]] if output.ndim >= 2 else grad)
    return outputs, grads


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def cached_gradient_backward(
    model: RetrievalModel, batch: dict[str, Tensor], micro_batch: int, scale: Callable[[Tensor], Tensor]
) -> tuple[Tensor, dict[str, float]]:
    """The whole batch's loss, its gradient left in the parameters' `.grad`, encoding `micro_batch` rows at a
    time; `scale` multiplies the loss before backward (fp16's gradient scaler)."""
    device = model.device
    rows = [slice(start, start + micro_batch) for start in range(0, len(batch["tokens"]), micro_batch)]

    def encode(part: slice) -> tuple[Features, Features]:
        return model.encode_batch(batch["tokens"][part], batch["frames"][part], batch["frame_mask"][part])

    rng_states, texts, videos = [], [], []
    with torch.no_grad():
        for part in rows:
            rng_states.append(_rng_state(device))  # the second pass replays this one's randomness (dropout)
            text, video = encode(part)
            texts.append(text)
            videos.append(video)
    text = _with_grad(type(texts[0]).cat(texts, pad=True))
    video = _with_grad(type(videos[0]).cat(videos, pad=True))
    loss, parts = model.loss(text, video)
    scale(loss).backward()  # into the loss's own parameters (logit scale, the head's scoring) and the features
    after = _rng_state(device)  # past the loss's own draws (X-Pool's dropout): the next step goes on from here
    for part, state in zip(rows, rng_states, strict=True):
        _set_rng_state(state, device)
        encoded_text, encoded_video = encode(part)
        text_outputs, text_grads = _backward_cached(encoded_text, text, part)
        video_outputs, video_grads = _backward_cached(encoded_video, video, part)
        torch.autograd.backward(text_outputs + video_outputs, text_grads + video_grads)
    _set_rng_state(after, device)
    return loss.detach(), parts


def average_across_ranks(model: nn.Module) -> None:
    """DDP's gradient averaging, in one all-reduce of every gradient flattened; nothing without a process group."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for grad, averaged in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        grad.copy_(averaged.view_as(grad))

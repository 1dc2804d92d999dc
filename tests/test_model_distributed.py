"""The loss of a global batch split over 2 gloo processes equals the 1-process loss, and so do the gradients."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hvd.config import ModelConfig
from hvd.model import build_model, build_tokenizer
from hvd.model.losses import gather_across_ranks

WORLD = 2
CAPTIONS = ["a red square slides left", "a blue circle grows", "two green dots swap", "a yellow bar spins"]


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = build_tokenizer(ModelConfig(), 32)(CAPTIONS)
    return tokens, torch.randn(len(CAPTIONS), 4, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def loss_and_gradients(
    tokens: torch.Tensor, frames: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = build_model(ModelConfig())
    loss, _ = model.loss(model.encode_text(tokens), model.encode_video(frames))
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        tokens, frames = global_batch()
        local = slice(rank * len(CAPTIONS) // WORLD, (rank + 1) * len(CAPTIONS) // WORLD)
        loss, gradients = loss_and_gradients(tokens[local], frames[local])
        for gradient in gradients.values():  # what DDP does: average over ranks
            dist.all_reduce(gradient)
            gradient /= WORLD
        model = build_model(ModelConfig(head="meanp"))
        try:  # ranks holding different batch sizes must be told, not hang
            gather_across_ranks(model.encode_text(tokens[: rank + 1]))
            uneven = "accepted"
        except ValueError as err:
            uneven = str(err)
        if rank == 0:
            torch.save({"loss": loss, "gradients": gradients, "uneven": uneven}, out)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD)
    split = torch.load(out)
    loss, gradients = loss_and_gradients(*global_batch())

    assert split["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    assert split["gradients"].keys() == gradients.keys()
    for name, expected in gradients.items():
        difference = (split["gradients"][name] - expected).norm()
        assert difference <= 1e-5 * expected.norm(), name
    assert "same local batch size" in split["uneven"] and "[1, 2]" in split["uneven"]

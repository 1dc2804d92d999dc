"""What a training run listens on: loopback only, on the default local Ray (no RAY_ADDRESS).

The end-to-end run is the real command in a subprocess (`training_command.py`, shared with the stress smoke),
which starts its own Ray as a user's would. Every listening socket of it and of its descendants (Ray's daemons,
agents and workers, the Ray Train workers with torch.distributed's store and gloo's sockets) is sampled until
it exits.
"""

from __future__ import annotations

import re
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist
from training_command import listening

from hvd.train.rendezvous import join_process_group, listen_on_loopback

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def documented_training_ports(workers: int) -> int:
    """Ports docs/security.md's "What listens where" table gives the training workers, beyond Ray's one each."""
    section = (ROOT / "docs" / "security.md").read_text().split("What listens where", 1)[1].split("\n\n**", 1)[0]
    rows = re.findall(r"^\| ([^|]+?) \| ([^|]+?) \| (\d+) \|$", section, re.M)
    return sum(int(count) * (workers if where.startswith("each") else 1) for _, where, count in rows
               if "training" in where)


def test_the_process_group_listens_on_loopback(monkeypatch):
    """The loopback set-up alone, one gloo rank: its store and gloo's socket are on 127.0.0.1."""
    for variable in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        monkeypatch.delenv(variable, raising=False)  # restored afterwards: the set-up sets them
    me = psutil.Process()
    before = listening(me)
    port = listen_on_loopback()
    join_process_group("gloo", world_rank=0, world_size=1, port=port, timeout_s=30)
    try:
        dist.all_reduce(torch.ones(1))
        opened = {(address, at) for _, _, address, at in listening(me) - before}
    finally:
        dist.destroy_process_group()
    assert ("127.0.0.1", port) in opened and {address for address, _ in opened} <= set(LOOPBACK)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_training_run_on_the_default_local_ray_listens_on_loopback_only(training_command):
    assert training_command.summary["succeeded"] == 1, training_command.log[-3000:]
    seen = training_command.listeners
    elsewhere = sorted({(command, address, port) for _, command, address, port in seen
                        if address not in LOOPBACK})
    assert not elsewhere, "\n".join(map(str, elsewhere))
    # Sampled while it trained: each training worker's Ray port, then the store and gloo as documented.
    trainers = {pid for pid, command, _, _ in seen if command.startswith("ray::RayTrainWorker")}
    ports = {(pid, port) for pid, _, _, port in seen if pid in trainers}
    assert len(trainers) == 2
    # At least those: on a loaded machine a worker was seen with two ports more over the run (all on loopback,
    # which is what this test is for), so the count is a floor, not an equality.
    assert len(ports) >= len(trainers) + documented_training_ports(len(trainers)), ports

"""torch.distributed's process group on loopback when every training worker runs on a loopback node.

Ray Train's `TorchConfig` has rank 0 host the group's rendezvous store (c10d's TCPStore), which listens
on every interface whatever address it is given, and gloo and NCCL pick their sockets' interface from the
hostname. On the default local Ray and on `cluster/local.sh` every node's address is 127.0.0.1, so there
the store is built on a socket already bound to 127.0.0.1 (TCPStore's `master_listen_fd`) and gloo and
NCCL are pointed at the loopback interface. On a cluster of real nodes Ray's own set-up runs unchanged:
the store listens where the other nodes reach it.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import ray
import torch.distributed as dist
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

LOOPBACK = "127.0.0.1"
LOOPBACK_INTERFACE = "lo"
# Rank 0's listening socket, by port, from `listen_on_loopback` until its store takes it (one worker process).
_listening: dict[int, socket.socket] = {}


def listen_on_loopback() -> int:
    """Bind the store's socket on this worker (rank 0) now, so that no other process takes its port."""
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen()
    port = listener.getsockname()[1]
    _listening[port] = listener
    return port


def join_process_group(backend: str, world_rank: int, world_size: int, port: int, timeout_s: int) -> None:
    for variable in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        os.environ.setdefault(variable, LOOPBACK_INTERFACE)
    if backend == "nccl" and "TORCH_NCCL_BLOCKING_WAIT" not in os.environ:
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # as Ray's: a stuck collective fails
    timeout = timedelta(seconds=timeout_s)
    if world_rank == 0:  # the store owns the socket from here and closes it
        listener = _listening.pop(port).detach()
        store = dist.TCPStore(LOOPBACK, port, world_size, True, timeout, master_listen_fd=listener)
    else:
        store = dist.TCPStore(LOOPBACK, port, world_size, False, timeout)
    dist.init_process_group(backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout)


class _LoopbackTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: LoopbackTorchConfig) -> None:
        addresses = worker_group.execute(ray.util.get_node_ip_address)
        if not all(ipaddress.ip_address(address).is_loopback for address in addresses):
            super().on_start(worker_group, backend_config)
            return
        port = worker_group.execute_single(0, listen_on_loopback)  # TorchTrainer has set the backend
        worker_group.execute(_set_torch_distributed_env_vars)  # LOCAL_RANK and the like, as Ray's set-up
        ray.get([
            worker_group.execute_single_async(
                rank, join_process_group, backend=backend_config.backend, world_rank=rank,
                world_size=len(worker_group), port=port, timeout_s=backend_config.timeout_s,
            )
            for rank in range(len(worker_group))
        ])


@dataclass
class LoopbackTorchConfig(TorchConfig):
    """`TorchConfig` whose process group listens on loopback when every worker's node is 127.0.0.1."""

    @property
    def backend_cls(self) -> type[_TorchBackend]:
        return _LoopbackTorchBackend

"""The process group a compression runs in: one process, or ranks started by ``torchrun``.

Compression splits its calibration windows across ranks, sums each block's statistics, gives
each layer's factorization to one owner rank and broadcasts the result. Everything here is a
thin layer over ``torch.distributed``'s default group: there is no process pool or RPC of our
own. Statistics and factors travel on the CPU with gloo, on the GPU with NCCL.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

__all__ = ["Ranks", "init_from_env", "process_group"]


@dataclass(frozen=True)
class Ranks:
    """This process's place in the default process group (``rank 0 of 1`` without one)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> "Ranks":
        """The default group when ``torch.distributed`` is initialized, else a single process."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def main(self) -> bool:
        """Rank 0: the one that allocates, writes and reports."""
        return self.rank == 0

    def shard(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of ``rows`` (the first ranks take one more when uneven)."""
        if rows.shape[0] < self.world:
            raise ValueError(f"{rows.shape[0]} calibration windows cannot be split over {self.world} ranks; "
                             f"use at least {self.world}")
        return rows.tensor_split(self.world)[self.rank]

    def owner(self, index: int) -> int:
        """The rank that factorizes the ``index``-th layer of a block (round robin)."""
        return index % self.world

    def reduce_sum(self, tensor: torch.Tensor, dst: int) -> torch.Tensor:
        """Sum ``tensor`` over ranks into rank ``dst`` (other ranks' results are undefined)."""
        if self.world > 1:
            _on_wire(tensor, lambda t: dist.reduce(t, dst=dst, op=dist.ReduceOp.SUM))
        return tensor

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks, in place, on every rank."""
        if self.world > 1:
            _on_wire(tensor, lambda t: dist.all_reduce(t, op=dist.ReduceOp.SUM))
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Rank ``src``'s ``tensor`` on every rank, in place (same shape and dtype everywhere)."""
        if self.world > 1:
            _on_wire(tensor, lambda t: dist.broadcast(t, src=src))
        return tensor

    def broadcast_object(self, value, src: int = 0):
        """Rank ``src``'s picklable ``value`` on every rank."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _on_wire(tensor: torch.Tensor, op) -> None:
    """Run the collective ``op`` on ``tensor``, through the GPU when the backend is NCCL."""
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        staged = tensor.to(f"cuda:{torch.cuda.current_device()}")
        op(staged)
        tensor.copy_(staged)
    else:
        op(tensor)


def init_from_env(device: str | None) -> Ranks:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1 in the environment).

    NCCL when the work runs on CUDA, else gloo; each rank takes GPU ``LOCAL_RANK``. Without
    ``torchrun`` (or with one process) nothing is initialized and this is rank 0 of 1.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return Ranks.current()
    cuda = device is None and torch.cuda.is_available() or (device or "").startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Ranks.current()


@contextmanager
def process_group(device: str | None) -> Iterator[Ranks]:
    """:func:`init_from_env` for the ``with`` block; a group it started is destroyed afterwards."""
    started = not (dist.is_available() and dist.is_initialized())
    ranks = init_from_env(device)
    try:
        yield ranks
    finally:
        if started and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

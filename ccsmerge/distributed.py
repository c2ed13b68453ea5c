"""Splitting a streaming merge over the processes of a torch.distributed job
(torchrun): every process plans the same merge from the headers, takes its
share of the output shards, and streams, merges and writes them under its
own memory budget; rank 0 prepares the output folder and finishes it. Only
small Python objects travel between processes (over gloo), never tensors, so
the output is byte-identical to a single-process merge."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import TypeVar

import torch

from .errors import MergeError
from .planning import MergePlan

R = TypeVar("R")


class Coordinator:
    """A single process: rank 0 of 1."""

    rank = 0
    world = 1

    def agree(self, step: Callable[[], R], *, on_rank: int | None = None) -> list[R | None]:
        """Run step (on every rank, or only on_rank); if it fails anywhere,
        raise that failure on every rank. Returns each rank's result."""
        return [step()] if on_rank in (None, self.rank) else [None]

    def local_device(self, device: str) -> str:
        return device

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


class TorchDistributed(Coordinator):
    """The processes of a torch.distributed job; the group is created from
    torchrun's environment when none is initialised yet."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        if not dist.is_available():
            raise MergeError("distributed: this torch build has no torch.distributed")
        self.owns_group = not dist.is_initialized()
        if self.owns_group:
            if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
                raise MergeError("distributed: run under torchrun, or initialise a process group first")
            dist.init_process_group(backend="gloo")
        # Coordination only needs a CPU group; a job on NCCL gets a gloo side group.
        self.group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()

    def agree(self, step, *, on_rank=None):
        result = error = None
        if on_rank in (None, self.rank):
            try:
                result = step()
            except Exception as exc:  # reported to every rank below
                error = exc
        reports = [None] * self.world
        message = None
        if error is not None:
            message = str(error) if isinstance(error, MergeError) else f"{type(error).__name__}: {error}"
        self.dist.all_gather_object(reports, (result, message), group=self.group)
        failed = [(rank, msg) for rank, (_, msg) in enumerate(reports) if msg is not None]
        if failed:
            if error is not None and failed[0][0] == self.rank:
                raise error
            rank, msg = failed[0]
            raise MergeError(f"rank {rank}: {msg}")
        return [r for r, _ in reports]

    def barrier(self) -> None:
        self.dist.barrier(group=self.group)

    def local_device(self, device: str) -> str:
        """One GPU per process: cuda means cuda:LOCAL_RANK."""
        local = int(os.environ.get("LOCAL_RANK", "0"))
        wants_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        return f"cuda:{local}" if wants_cuda else device

    def close(self) -> None:
        if self.owns_group:
            self.dist.destroy_process_group()


def shard_costs(plan: MergePlan) -> list[float]:
    """Estimated seconds per output shard: bytes read (at ~2 GB/s) plus, for
    low-rank tensors, the randomized SVD's flops (at ~50 GFLOP/s)."""
    by_name = {t.name: t for t in plan.tensors}
    costs = []
    for shard in plan.shards:
        seconds = 0.0
        for out in shard:
            t = by_name[out.name]
            seconds += plan.read_bytes_per_pass[t.name] * t.passes / 2e9
            if t.rank is not None:
                *lead, m, n = t.shape  # a stack of matrices: one SVD per slice
                width = min(2 * t.rank + 10, m, n)
                seconds += 2 * plan.models * math.prod(lead) * m * n * width * 11 / 5e10
        costs.append(seconds)
    return costs


def assign_shards(plan: MergePlan, world: int) -> list[int]:
    """The rank that writes each shard: longest first, each to the least loaded
    rank (ties to the lower rank), the same on every rank."""
    costs = shard_costs(plan)
    load = [0.0] * world
    owner = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[index] = rank
        load[rank] += costs[index]
    return owner

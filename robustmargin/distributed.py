"""torch.distributed in one place: the rank and world from torchrun's environment, the backend, the
deal-out of work units, barriers and all-reduces. A single process (no WORLD_SIZE, or 1) is world size 1,
and every function here is then a no-op, so stages call them unconditionally."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """The rank, world size and local rank that torchrun put in the environment (1 process without it)."""
    env = os.environ
    return World(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def cores() -> int:
    """The CPU cores this process may run on (its affinity mask, which taskset and cgroups narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def init(device: str = "cpu") -> World:
    """Join the process group when launched by torchrun (nccl for cuda, gloo otherwise) and pick this
    rank's device: cuda:LOCAL_RANK, or the CPU with the cores shared out so ranks do not oversubscribe.
    More ranks than GPUs on a node share them round-robin; NCCL cannot put two ranks on one GPU, so the
    group then uses gloo (which also reduces CUDA tensors)."""
    w = world()
    if w.size > 1 and not dist.is_initialized():
        cuda = str(device).startswith("cuda")
        local = int(os.environ.get("LOCAL_WORLD_SIZE", w.size))
        if cuda:
            torch.cuda.set_device(rank_device("cuda"))
        else:
            torch.set_num_threads(max(1, cores() // local))
        dist.init_process_group("nccl" if cuda and local <= torch.cuda.device_count() else "gloo")
    return w


@contextlib.contextmanager
def group(device: str = "cpu") -> Iterator[World]:
    """`init(device)` for the length of a block; a process group created here is destroyed after it,
    one that already existed is left as it was."""
    created = world().size > 1 and not dist.is_initialized()
    w = init(device)
    try:
        yield w
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def rank_device(device: str) -> torch.device:
    """cuda → cuda:LOCAL_RANK under torchrun (modulo the GPUs there are); anything else unchanged."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and world().size > 1:
        return torch.device("cuda", world().local_rank % max(1, torch.cuda.device_count()))
    return dev


def deal(items: Sequence[T], w: World | None = None, *, snake: bool = False) -> list[T]:
    """This rank's share of `items`: every size-th item from its rank, the same on every launch.
    With `snake`, every other round goes backwards (ranks 0 1 1 0 0 1 …), so that when the cost of the
    items drifts along the list (later batches of a group, a more accurate checkpoint) no rank always
    takes the first, larger item of each round."""
    w = w or world()
    if not snake:
        return list(items[w.rank::w.size])
    return [item for i, item in enumerate(items)
            if (i % w.size if (i // w.size) % 2 == 0 else w.size - 1 - i % w.size) == w.rank]


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if active():
        dist.barrier()


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place over ranks; op is sum, max or min."""
    if active():
        dist.all_reduce(t, {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t


def all_reduce_log_sum_exp(log_values: torch.Tensor) -> torch.Tensor:
    """log Σ_ranks exp(v) elementwise, in log space: an all-reduce of the max, then of Σ exp(v − max)."""
    if not active():
        return log_values
    top = all_reduce(log_values.detach().clone(), "max")
    safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return safe + torch.log(all_reduce(torch.exp(log_values - safe), "sum"))

"""torch.distributed in one place: the rank and world from torchrun's environment, the backend, the
deal-out of work units, barriers and all-reduces. A single process (no WORLD_SIZE, or 1) is world size 1,
and every function here is then a no-op, so stages call them unconditionally."""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

from robustmargin.errors import UserError

T = TypeVar("T")
_side: dict = {}  # under nccl: the gloo group that wait_all uses, and the default group ("world") it belongs to


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
    """Join the process group when launched by torchrun and pick this rank's device (`rank_device`):
    on CUDA, that GPU made current and the nccl backend; on the CPU, gloo with the cores shared out so
    ranks do not oversubscribe. A bad device is a one-line UserError before any CUDA call."""
    w = world()
    if w.size > 1 and not dist.is_initialized():
        dev = rank_device(device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        else:
            torch.set_num_threads(max(1, cores() // local_size()))
        dist.init_process_group(backend(dev))
        # made now, while every rank is here: wait_all needs a gloo group, and NCCL has no monitored barrier
        if backend(dev) != "gloo":
            _side.update(gloo=dist.new_group(backend="gloo"), world=dist.group.WORLD)
    return w


def backend(device: torch.device | str) -> str:
    """nccl for CUDA, gloo for the CPU."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def local_size() -> int:
    """The ranks on this node (torchrun's LOCAL_WORLD_SIZE; without it, all of them)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world().size))


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


_LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@contextlib.contextmanager
def alone(device: str = "cpu") -> Iterator[World]:
    """Run a block as a one-process job on this rank's share of the machine, for work dealt out whole
    to ranks (the runs of a sweep): inside it every stage sees world size 1 — no process group, no
    collectives — on this rank's GPU (`rank_device`; made the current CUDA device, which plain "cuda" then
    means) or on this rank's share of the CPU cores. Yields the rank's own World; the environment is
    restored after."""
    if active():
        raise RuntimeError("alone() needs this rank outside any process group")
    w = world()
    saved_env, saved_threads = {k: os.environ.get(k) for k in _LAUNCH_ENV}, torch.get_num_threads()
    if w.size > 1:
        dev = rank_device(device, collective=False)  # read while the launch environment is still there
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        else:
            torch.set_num_threads(max(1, cores() // local_size()))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    try:
        yield w
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        torch.set_num_threads(saved_threads)


def rank_device(device: torch.device | str, *, collective: bool = True) -> torch.device:
    """This rank's device for a configured one ("cpu", "cuda" or "cuda:N"); what cannot work is a one-line
    UserError. One process: the device as given. Under torchrun with CUDA: cuda:LOCAL_RANK when every rank
    sees the node's GPUs, cuda:0 when each rank sees a single GPU of its own (a per-task
    CUDA_VISIBLE_DEVICES, as SLURM sets). An explicit cuda:N is refused there (every rank would take the
    same GPU), and so are more ranks on a node than GPUs (NCCL cannot put two ranks on one GPU) unless
    not `collective`: ranks that never meet over NCCL (`alone`) then share the GPUs round-robin."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"bad device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise UserError(f"device {device} asked for, but torch sees no CUDA device; use --device cpu")
    w, visible = world(), torch.cuda.device_count()
    if w.size == 1:
        if dev.index is not None and dev.index >= visible:
            raise UserError(f"device {device} asked for, but torch sees {visible} CUDA device(s)")
        return dev
    if dev.index is not None:
        raise UserError(f"device {device} names one GPU for all {w.size} ranks; use --device cuda "
                        "(each rank then takes its own, cuda:LOCAL_RANK)")
    if visible == 1:
        return torch.device("cuda", 0)
    if not collective:
        return torch.device("cuda", w.local_rank % visible)
    if local_size() > visible:
        raise UserError(f"{local_size()} ranks on this node but {visible} GPUs visible to each; start at most "
                        f"{visible} (torchrun --nproc-per-node {visible})")
    return torch.device("cuda", w.local_rank)


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
    """For ranks that arrive together (it is bound by the process group's timeout); after uneven shares
    of work, use wait_all."""
    if active():
        dist.barrier()


WAIT_S = 7 * 24 * 3600.0  # wait_all's default bound: a week, longer than any share of work here


def wait_all(timeout: float = WAIT_S) -> None:
    """Wait for every rank, however long the slowest takes up to `timeout` seconds: the barrier to use after
    uneven shares of work (attack units), where one rank can finish hours before another. A plain barrier
    would abort the job once the process group's timeout (10 to 30 minutes by default) passed; this one is
    a monitored barrier over gloo with its own timeout, and when it runs out the error names the ranks
    that never arrived."""
    if not active():
        return
    if dist.get_backend() == "gloo":
        side = None  # the default group itself
    elif _side.get("world") is dist.group.WORLD:
        side = _side["gloo"]
    else:
        raise RuntimeError("wait_all needs a gloo process group, or the one distributed.init makes")
    dist.monitored_barrier(group=side, timeout=timedelta(seconds=timeout), wait_all_ranks=True)


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


def all_reduce_sum_(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sum each tensor over ranks, through one flat buffer (one collective, not one per tensor)."""
    if not active() or not tensors:
        return tensors
    flat = all_reduce(torch.cat([t.reshape(-1) for t in tensors]))
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def all_gather_rows(local: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Concatenate every rank's rows in rank order; `sizes` are the row counts of all ranks (they may differ,
    so each part is padded to the largest for the collective and trimmed after)."""
    if not active():
        return local
    width = max(sizes)
    padded = torch.zeros((width, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def on_main(fn):
    """Run `fn` on rank 0 only (the rank that writes shared files); elsewhere a no-op returning None."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs) if world().is_main else None
    return wrapper


def agreed_max(value: float, device: torch.device | str = "cpu") -> float:
    """The largest of every rank's `value`, so that decisions taken from it (a time budget) agree."""
    if not active():
        return value
    return float(all_reduce(torch.tensor(value, dtype=torch.float64, device=device), "max"))

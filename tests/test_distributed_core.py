"""robustmargin.distributed with two gloo ranks on the CPU: the log-space all-reduce and the deal-out."""
from __future__ import annotations

import functools
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from robustmargin import distributed
from robustmargin.distributed import World, deal

# per rank: log-values far outside float range in linear space, and -inf (a zero) on one side
LOG_VALUES = [torch.tensor([-2000.0, 3.0, -float("inf"), 700.0], dtype=torch.float64),
              torch.tensor([-2001.0, -float("inf"), -float("inf"), 800.0], dtype=torch.float64)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


GROUP_TIMEOUT_S, LATE_S = 3, 6  # the late rank arrives well after the process group's own timeout


def _rank(rank: int, port: int, results) -> None:
    import time
    from datetime import timedelta

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # a short process-group timeout for the group that distributed.init makes
    init_group = torch.distributed.init_process_group
    torch.distributed.init_process_group = functools.partial(init_group, timeout=timedelta(seconds=GROUP_TIMEOUT_S))
    w = distributed.init("cpu")
    try:
        results[f"world {rank}"] = w
        results[rank] = distributed.all_reduce_log_sum_exp(LOG_VALUES[rank].clone())
        distributed.barrier()
        # uneven shares of work: rank 1 arrives long after the group's timeout
        start = time.monotonic()
        if rank == 1:
            time.sleep(LATE_S)
        distributed.wait_all(timeout=60)
        results[f"waited {rank}"] = time.monotonic() - start
        # the premise: a plain barrier in the same situation gives up after the group's timeout
        if rank == 1:
            time.sleep(LATE_S)
        try:
            distributed.barrier()
            results[f"barrier {rank}"] = "passed"
        except RuntimeError:
            results[f"barrier {rank}"] = "timed out"
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks():
    """What two gloo ranks computed and saw (one spawn for every test: spawning is the slow part)."""
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(_free_port(), results), nprocs=2, join=True)
    return dict(results)


def test_init_reads_the_launch_environment(two_ranks):
    assert [two_ranks[f"world {r}"] for r in range(2)] == [World(0, 2, 0), World(1, 2, 1)]


def test_log_sum_exp_over_two_ranks_matches_direct_logsumexp(two_ranks):
    expected = torch.logsumexp(torch.stack(LOG_VALUES), dim=0)
    for rank in range(2):
        got = two_ranks[rank]
        assert torch.equal(torch.isinf(got), torch.isinf(expected))
        finite = torch.isfinite(expected)
        torch.testing.assert_close(got[finite], expected[finite], rtol=1e-15, atol=1e-12)


def test_wait_all_outlasts_the_process_group_timeout(two_ranks):
    for rank in range(2):  # both ranks came out of the wait, once the late one arrived
        assert LATE_S - 0.5 < two_ranks[f"waited {rank}"] < LATE_S + 10
    assert two_ranks["barrier 0"] == "timed out"


def test_wait_all_and_barrier_are_no_ops_alone(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    distributed.wait_all(timeout=0.001)
    distributed.barrier()


def test_single_process_is_a_world_of_one(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.world() == World()
    t = torch.tensor([1.0, -float("inf")])
    assert distributed.all_reduce_log_sum_exp(t) is t


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_deal_covers_every_item_once(size):
    items = list(range(11))
    shares = [deal(items, World(rank, size, rank)) for rank in range(size)]
    assert sorted(i for share in shares for i in share) == items
    assert shares == [deal(items, World(rank, size, rank)) for rank in range(size)]  # same on every launch


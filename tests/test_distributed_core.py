"""robustmargin.distributed with two gloo ranks on the CPU: the log-space all-reduce and the deal-out."""
from __future__ import annotations

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


def _rank(rank: int, port: int, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    w = distributed.init("cpu")
    try:
        results[rank] = distributed.all_reduce_log_sum_exp(LOG_VALUES[rank].clone())
        distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()
    assert w == World(rank, 2, rank)


def test_log_sum_exp_over_two_ranks_matches_direct_logsumexp():
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(_free_port(), results), nprocs=2, join=True)
    expected = torch.logsumexp(torch.stack(LOG_VALUES), dim=0)
    for rank in range(2):
        got = results[rank]
        assert torch.equal(torch.isinf(got), torch.isinf(expected))
        finite = torch.isfinite(expected)
        torch.testing.assert_close(got[finite], expected[finite], rtol=1e-15, atol=1e-12)


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

"""Starting a process group from Python: results come back by rank, a failing rank's own error is
reported (not its peer's "connection closed"), and functions a new process cannot import are refused."""

import pytest
import torch
from spawned import fail_on_rank_1, rank_sum

from minigpt.parallel.launch import shard_range, spawn


def test_spawn_returns_each_ranks_result():
    out = spawn(rank_sum, 3, 10, timeout=60)
    assert [o["rank"] for o in out] == [0, 1, 2] and all(o["world"] == 3 for o in out)
    assert all(torch.equal(o["sum"], torch.tensor([33.0])) for o in out)  # 10 + 11 + 12


def test_a_failing_rank_is_named_with_its_own_error():
    with pytest.raises(RuntimeError, match=r"(?s)rank 1 of fail_on_rank_1 failed.*rank 1 failed on purpose"):
        spawn(fail_on_rank_1, 2, timeout=60)


def test_bad_arguments_are_refused():
    def local(rank, world):
        return rank
    with pytest.raises(ValueError, match="top-level function"):
        spawn(local, 2)
    with pytest.raises(ValueError, match="world=0"):
        spawn(rank_sum, 0, 1)


def test_shard_range_covers_every_item_once():
    for n in range(0, 12):
        for world in range(1, 5):
            pieces = [shard_range(n, r, world) for r in range(world)]
            assert [i for s in pieces for i in range(n)[s]] == list(range(n))
            assert max(s.stop - s.start for s in pieces) - min(s.stop - s.start for s in pieces) <= 1

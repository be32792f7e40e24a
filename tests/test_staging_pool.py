"""The staged transport's host buffers are a bounded pool (hpcattn/comm/mpi.py, "Bound"): the fake
device of tests/test_staging.py, one rank sending to itself on MPI.COMM_SELF."""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.test_staging import assert_only_host_buffers, make_comm


def _pooled(comm) -> int:
    return sum(b.nbytes for b in comm._pool.values() if not b.transient)


def test_messages_in_flight_beyond_the_bound_go_through_transient_buffers():
    """Like Lamina's hand-over (every layer in flight): the pool keeps at most its bound, the
    messages over it are staged through pageable buffers dropped on completion, nothing waits,
    every message arrives, and a warning says so once."""
    comm, spy = make_comm()
    comm.pool_bytes = 1000
    sends = [torch.arange(50, dtype=torch.float64) + 100 * i for i in range(5)]     # 400 B each
    recvs = [torch.empty(50, dtype=torch.float64) for _ in range(5)]
    with pytest.warns(RuntimeWarning, match="bound \\(1000 bytes\\) is reached"):
        reqs = [comm.irecv(r, 0, 3) for r in recvs] + [comm.isend(s, 0, 3) for s in sends]
    assert _pooled(comm) <= 1000 and sum(b.transient for b in comm._pool.values()) == 8
    assert comm.staging_stats == {"transient": 8, "transient_bytes": 8 * 400, "evicted": 0}
    assert_only_host_buffers(comm, spy, *sends, *recvs)        # transient buffers are host buffers too
    for q in reqs:
        q.wait()
    assert all(torch.equal(r, s) for r, s in zip(recvs, sends))
    assert not any(b.transient for b in comm._pool.values()) and not comm._inflight    # dropped on completion
    # the next messages reuse the pooled slots, with no new transient buffer and no second warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = torch.empty(50, dtype=torch.float64)
        q = comm.irecv(r, 0, 4)
        comm.isend(sends[1], 0, 4).wait()
        q.wait()
    assert torch.equal(r, sends[1]) and comm.staging_stats["transient"] == 8 and _pooled(comm) <= 1000


def test_idle_slots_make_room_for_a_larger_message():
    """A message larger than the idle pooled buffers frees them (evicted) rather than passing the
    bound; one larger than the bound itself is transient; a collective's slot too."""
    comm, _ = make_comm()
    comm.pool_bytes = 1000
    for i in range(2):                                     # two idle slots of 400 B
        r = torch.empty(100, dtype=torch.float32)
        reqs = [comm.irecv(r, 0, 1), comm.isend(torch.ones(100), 0, 1)]
        for q in reqs:
            q.wait()
    assert _pooled(comm) == 800
    big = torch.arange(200, dtype=torch.float32)           # 800 B: the receive's slot grows, the idle one
    out = torch.empty_like(big)                            # is evicted; the send's cannot fit: transient
    with pytest.warns(RuntimeWarning):
        reqs = [comm.irecv(out, 0, 2), comm.isend(big, 0, 2)]
    assert comm.staging_stats == {"transient": 1, "transient_bytes": 800, "evicted": 1} and _pooled(comm) == 800
    for q in reqs:
        q.wait()
    assert torch.equal(out, big)
    t = torch.arange(300, dtype=torch.float64)             # 2400 B > the bound: transient, still right
    expect = t.clone()
    comm.allreduce(t)
    assert torch.equal(t, expect) and comm._pool["allreduce"].transient and comm.staging_stats["transient"] == 2
    comm.allreduce(torch.ones(10, dtype=torch.float64))    # its next use drops it for a pooled buffer
    assert not comm._pool["allreduce"].transient and _pooled(comm) <= 1000


def test_default_bound_is_documented_value():
    from hpcattn.comm.mpi import MPIComm

    comm, _ = make_comm()
    assert comm.pool_bytes == MPIComm.POOL_BYTES == 4 << 30

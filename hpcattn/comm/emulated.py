"""A communicator inside one process: virtual rank ``rank`` of ``size`` is handed exactly what a
real world would deliver to it (the P-host projection, :mod:`hpcattn.jobs.projection`, runs each
virtual host's work one after the other on one device)."""

from __future__ import annotations

from hpcattn.comm.base import Comm, Counters, Request


class EmulatedComm(Comm):
    """The world communicator of virtual rank ``rank`` of ``size``, inside one process.

    ``sendrecv_start`` fills ``recv`` with ``blocks[(rank - step - 1) % size]`` (what a ring
    delivers at each step); ``allgather`` returns ``gathered`` (precomputed contributions of all
    hosts). Nothing else is supported: the projection needs nothing else.
    """

    def __init__(self, rank: int, size: int, counters: Counters, blocks=None, gathered=None):
        self.rank, self.size, self.counters = rank, size, counters
        self.transport = "emulated"
        self.blocks, self.gathered = blocks, gathered
        self._step = 0
        self.mpi = _NoMPI(size)

    def sendrecv_start(self, send, dest, recv, source):
        self.counters.add(send.numel() * send.element_size())
        self._step += 1
        recv.copy_(self.blocks[(self.rank - self._step) % self.size])
        return Request(lambda: None)

    def allgather(self, t):
        self.counters.add(t.numel() * t.element_size())
        if self.gathered is None:
            raise RuntimeError("EmulatedComm.allgather: contributions not provided")
        return self.gathered

    def barrier(self):
        pass


class _NoMPI:
    def __init__(self, size):
        self.size = size

    def allreduce(self, x):
        raise RuntimeError("the projection supports the zigzag ring layout only")

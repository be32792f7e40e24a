"""Ranks as threads of one process, and a recorded run replayed one rank at a time.

The model-level projection (:mod:`hpcattn.jobs.model_projection`) runs a P-rank job on one device
in two passes, both through the code a real distributed run executes:

1. :class:`ThreadWorld` - the P ranks as P threads, each with its own :class:`ThreadComm` (a
   :class:`~hpcattn.comm.base.Comm`): collectives meet at a barrier and exchange tensors in
   memory. Every rank's calls are recorded (:class:`CommLog`): the operation, its payload bytes and
   what it returned.
2. :class:`ReplayComm` - one rank alone, its calls answered from its log in order (a call that
   differs from the recorded one is an error), so the rank's compute can be timed without the
   other ranks running beside it. Point-to-point transfers (the ring's KV blocks, up to gigabytes
   per layer) are not stored: the caller supplies them (``sendrecv_data``), e.g. from the other
   ranks' KV caches, which hold exactly what the ring sends.

Every call adds its payload to the shared :class:`~hpcattn.comm.base.Counters` as the real
transports do, and each log entry carries the phase it ran in (``CommLog.phase``), so a link model
can charge the recorded traffic per phase.

Supported: ``allgather``, ``broadcast``, ``allreduce``, ``sendrecv_start``, ``barrier`` and the
control plane's ``allreduce`` / ``allgather`` / ``bcast`` of host objects (``comm.mpi``); not the
tagged point-to-point ``isend`` / ``irecv`` (Lamina's hand-over).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from hpcattn.comm.base import Comm, Counters, Request


@dataclass
class Call:
    """One recorded call: ``op``, the payload bytes this rank contributed, the phase it ran in,
    and its result (the gathered / broadcast / reduced tensor or host object; None for sendrecv
    and barrier)."""

    op: str
    nbytes: int
    phase: str
    result: object = None
    peer: int = -1                    # sendrecv: the source rank


@dataclass
class CommLog:
    """The calls of one rank, in order, and the phase new calls are recorded under."""

    calls: list[Call] = field(default_factory=list)
    phase: str = "other"


class ThreadWorld:
    """Shared state of ``size`` thread ranks. A rank that raises calls :meth:`abort`, so the others
    leave their barrier with :class:`threading.BrokenBarrierError` instead of waiting forever.

    One rank runs at a time: a rank holds the baton (a lock) while it works and hands it on only
    while it waits at a barrier. So the ranks' work between two collectives never overlaps, and the
    device holds one rank's temporaries at a time (P ranks of a long prefill fit where one fits,
    plus what each keeps: its hidden states and KV cache)."""

    def __init__(self, size: int, timeout: float = 3600.0):
        self.size = size
        self._barrier = threading.Barrier(size, timeout=timeout)
        self.baton = threading.Lock()
        self._slots: list[object] = [None] * size
        self._result: object = None

    def wait(self) -> None:
        self.baton.release()
        try:
            self._barrier.wait()
        finally:
            self.baton.acquire()

    def abort(self) -> None:
        self._barrier.abort()

    def comm(self, rank: int, counters: Counters | None = None) -> "ThreadComm":
        return ThreadComm(self, rank, counters or Counters())

    def exchange(self, rank: int, value, combine: Callable[[list], object]):
        """Every rank hands ``value``; all get ``combine(values in rank order)`` (computed once)."""
        self._slots[rank] = value
        self.wait()
        if rank == 0:
            self._result = combine(list(self._slots))
        self.wait()
        result = self._result
        self.wait()                   # nobody overwrites the slots before everyone has read
        return result


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Control:
    """``comm.mpi`` of a thread or replayed rank: the control-plane calls hpcattn's methods make,
    each answered by the communicator's ``_control(op, value, combine)``."""

    def __init__(self, comm):
        self._c = comm

    def Get_rank(self) -> int:
        return self._c.rank

    def Get_size(self) -> int:
        return self._c.size

    def allreduce(self, x, op=None):
        return self._c._control("mpi.allreduce", x, sum)

    def allgather(self, x):
        return self._c._control("mpi.allgather", x, list)

    def bcast(self, x, root: int = 0):
        return self._c._control("mpi.bcast", x, lambda v: v[root])

    def Barrier(self) -> None:
        self._c.barrier()


class ThreadComm(Comm):
    """The world communicator of thread rank ``rank`` of a :class:`ThreadWorld`; records its calls
    in ``self.log``. Results handed back are this rank's own copies (the code may write to them)."""

    def __init__(self, world: ThreadWorld, rank: int, counters: Counters):
        self.world, self.rank, self.size, self.counters = world, rank, world.size, counters
        self.transport = "emulated"
        self.log = CommLog()
        self.mpi = _Control(self)

    def _record(self, op: str, nbytes: int, result=None, peer: int = -1):
        self.counters.add(nbytes)
        self.log.calls.append(Call(op, nbytes, self.log.phase, result, peer))
        return result

    def _control(self, op: str, value, combine):
        return self._record(op, 0, self.world.exchange(self.rank, value, combine))

    def allgather(self, t: torch.Tensor) -> torch.Tensor:
        out = self.world.exchange(self.rank, t, torch.stack)
        self._record("allgather", _nbytes(t), out)
        return out.clone()

    def broadcast(self, t: torch.Tensor, root: int = 0) -> torch.Tensor:
        out = self.world.exchange(self.rank, t.clone() if self.rank == root else None, lambda v: v[root])
        self._record("broadcast", _nbytes(t), out)
        if self.rank != root:
            t.copy_(out)
        return t

    def allreduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        self._check_reducible(t)
        if op not in ("sum", "max"):
            raise ValueError(f"allreduce op must be sum or max, got {op!r}")
        fold = (lambda v: torch.stack(v).sum(0)) if op == "sum" else (lambda v: torch.stack(v).amax(0))
        out = self.world.exchange(self.rank, t.clone(), fold)
        self._record("allreduce", _nbytes(t), out)
        t.copy_(out)
        return t

    def sendrecv_start(self, send: torch.Tensor, dest: int, recv: torch.Tensor, source: int) -> Request:
        boxes = self.world.exchange(self.rank, (dest, send), list)
        to, data = boxes[source]
        if to != self.rank:
            raise RuntimeError(f"sendrecv: rank {self.rank} expects data from {source}, which sent to {to}")
        recv.copy_(data)
        self.world.wait()             # the sender keeps its buffer intact until every copy is done
        self._record("sendrecv", _nbytes(send), None, peer=source)
        return Request(lambda: None)

    def barrier(self) -> None:
        self.world.wait()
        self._record("barrier", 0)


class ReplayComm(Comm):
    """Rank ``rank`` of ``size`` alone, its calls answered from ``log`` (a :class:`CommLog` of a
    :class:`ThreadComm`) in order. ``sendrecv_data(i, call, recv)`` fills ``recv`` with what the
    i-th sendrecv of this rank received (required only when the log holds sendrecv calls).
    :meth:`rewind` starts the log over (for repeated timed runs)."""

    def __init__(self, rank: int, size: int, log: CommLog, counters: Counters | None = None,
                 sendrecv_data: Callable[[int, Call, torch.Tensor], None] | None = None):
        self.rank, self.size, self.counters = rank, size, counters or Counters()
        self.transport = "emulated"
        self.recorded = log
        self.sendrecv_data = sendrecv_data
        self.log = CommLog()          # what this replay ran, with the phases of this run
        self.mpi = _Control(self)
        self.rewind()

    def rewind(self) -> None:
        self._next = 0
        self._sendrecvs = 0
        self.log.calls.clear()

    def _take(self, op: str, nbytes: int) -> Call:
        calls = self.recorded.calls
        if self._next >= len(calls):
            raise RuntimeError(f"replay of rank {self.rank}: call {self._next} ({op}) was not recorded "
                               f"(the recording has {len(calls)} calls)")
        call = calls[self._next]
        if call.op != op or call.nbytes != nbytes:
            raise RuntimeError(f"replay of rank {self.rank}: call {self._next} is {op} of {nbytes} bytes, "
                               f"the recording has {call.op} of {call.nbytes} bytes")
        self._next += 1
        self.counters.add(nbytes)
        self.log.calls.append(Call(op, nbytes, self.log.phase, None, call.peer))
        return call

    def allgather(self, t: torch.Tensor) -> torch.Tensor:
        return self._take("allgather", _nbytes(t)).result.clone()

    def broadcast(self, t: torch.Tensor, root: int = 0) -> torch.Tensor:
        call = self._take("broadcast", _nbytes(t))
        if self.rank != root:
            t.copy_(call.result)
        return t

    def allreduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        t.copy_(self._take("allreduce", _nbytes(t)).result)
        return t

    def sendrecv_start(self, send: torch.Tensor, dest: int, recv: torch.Tensor, source: int) -> Request:
        call = self._take("sendrecv", _nbytes(send))
        if self.sendrecv_data is None:
            raise RuntimeError(f"replay of rank {self.rank}: sendrecv needs the received data (sendrecv_data)")
        self.sendrecv_data(self._sendrecvs, call, recv)
        self._sendrecvs += 1
        return Request(lambda: None)

    def barrier(self) -> None:
        self._take("barrier", 0)

    def _control(self, op: str, value, combine):
        return self._take(op, 0).result


def run_threads(size: int, body: Callable[[int, ThreadWorld], object], timeout: float = 3600.0) -> list:
    """Run ``body(rank, world)`` for every rank in its own thread; returns the results in rank
    order, or raises the first rank's exception (the others are released from their barriers)."""
    world = ThreadWorld(size, timeout)
    results: list = [None] * size
    errors: list[BaseException | None] = [None] * size

    def main(rank: int) -> None:
        world.baton.acquire()
        try:
            results[rank] = body(rank, world)
        except BaseException as e:  # noqa: BLE001 - re-raised below, in the caller's thread
            errors[rank] = e
            world.abort()
        finally:
            world.baton.release()

    threads = [threading.Thread(target=main, args=(r,), name=f"rank{r}") for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = next((e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)), None)
    first = first or next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return results

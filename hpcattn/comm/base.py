"""The one communication interface every method uses, and its per-phase byte counters.

All data operations take torch tensors (CPU or GPU, contiguous) and are blocking unless they
return a :class:`Request`. Reductions (``allreduce``, ``reduce``) take float32/float64/integer
tensors only: hpcattn reduces in fp32, never in bf16 (MPI has no bf16 reduction type).

Byte counters record the *payload* each rank hands to each call (allreduce/reduce/broadcast: the
buffer; allgather: this rank's contribution; sendrecv: the bytes sent), summed per phase, so that
a job can report bytes per step and per phase without knowing the library's algorithm.
Point-to-point ``isend`` counts the bytes sent; ``irecv`` counts nothing (every byte is counted
once, by its sender).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Callable

import torch


class Counters:
    """Bytes and calls per phase for one rank; shared by all communicators of a context."""

    def __init__(self):
        self.current = "other"
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)

    @contextlib.contextmanager
    def phase(self, name: str):
        prev, self.current = self.current, name
        try:
            yield
        finally:
            self.current = prev

    def add(self, nbytes: int) -> None:
        self.bytes[self.current] += int(nbytes)
        self.calls[self.current] += 1

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()


class Request:
    """A pending non-blocking operation. ``wait()`` completes it (idempotent)."""

    def __init__(self, wait_fn: Callable[[], None]):
        self._wait_fn = wait_fn
        self._done = False

    def wait(self) -> None:
        if not self._done:
            self._wait_fn()
            self._done = True


class Comm:
    """Interface of a communicator over a group of ranks (world, node-local or leaders).

    Attributes:
        rank, size: this rank's index in the group and the group size.
        mpi: the mpi4py communicator of the same group (control plane: pickled host objects).
        transport: how device data moves: ``nccl``, ``gloo``, ``mpi_host`` (CPU ranks),
            ``mpi_staged`` (GPU data through pinned host buffers) or ``mpi_device`` (CUDA-aware MPI).
        counters: the shared :class:`Counters`.
    """

    rank: int
    size: int
    transport: str

    def __init__(self, mpi_comm, counters: Counters):
        self.mpi = mpi_comm
        self.rank = mpi_comm.Get_rank()
        self.size = mpi_comm.Get_size()
        self.counters = counters

    # data plane -----------------------------------------------------------------------------
    def allreduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place all-reduce (``sum`` or ``max``) of a float32/float64/int tensor; returns t."""
        raise NotImplementedError

    def reduce(self, t: torch.Tensor, op: str = "sum", root: int = 0) -> torch.Tensor:
        """In-place reduce to ``root`` (result valid on root only); returns t."""
        raise NotImplementedError

    def allgather(self, t: torch.Tensor) -> torch.Tensor:
        """Gather equal-shaped tensors from all ranks: returns (size, *t.shape), any dtype."""
        raise NotImplementedError

    def broadcast(self, t: torch.Tensor, root: int = 0) -> torch.Tensor:
        """In-place broadcast from ``root``; returns t."""
        raise NotImplementedError

    def sendrecv_start(self, send: torch.Tensor, dest: int, recv: torch.Tensor, source: int) -> Request:
        """Post a send of ``send`` to ``dest`` and a receive into ``recv`` from ``source``.

        Non-blocking: compute may be launched before ``Request.wait()``. After ``wait()`` the
        received data is visible to work queued on the current stream. ``send`` must not be
        modified and ``recv`` not read before ``wait()``.
        """
        raise NotImplementedError

    def isend(self, t: torch.Tensor, dest: int, tag: int) -> Request:
        """Post a send of contiguous ``t`` to group rank ``dest`` with message ``tag`` (0 <= tag < 100).

        Messages of one (source, dest, tag) are received in the order they were sent. ``t`` must
        not be modified before ``wait()``.
        """
        raise NotImplementedError

    def irecv(self, t: torch.Tensor, source: int, tag: int) -> Request:
        """Post a receive into contiguous ``t`` from group rank ``source``; ``t`` holds the data
        (visible to work queued on the current stream) after ``wait()``."""
        raise NotImplementedError

    def barrier(self) -> None:
        """Host barrier of the group (does not synchronise devices)."""
        self.mpi.Barrier()

    # helpers ---------------------------------------------------------------------------------
    @staticmethod
    def _check_reducible(t: torch.Tensor) -> None:
        if t.dtype in (torch.bfloat16, torch.float16):
            raise TypeError(f"reductions run in float32 or float64, got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError("communication buffers must be contiguous")

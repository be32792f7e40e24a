"""The ``mpi`` backend: mpi4py on host tensors, staged or direct for device tensors.

* CPU tensors go to MPI directly (transport ``mpi_host``).
* A device tensor goes to MPI directly only when the library is CUDA-aware (``mpi_device``);
  the stream is synchronised first, because mpi4py cannot synchronise it.
* Otherwise device data is staged through pinned host buffers, one per slot (a call site, or a
  point-to-point message in flight), reused for any size up to its capacity and regrown by at
  least 1.5x when a message is larger (``mpi_staged``), however many sizes a run sends (a growing
  cache sends a new size every step). Each host buffer carries the CUDA event of the last copy
  that reads it, so that it is never overwritten or freed while an asynchronous copy still uses it.
* **Bound**: the pooled (pinned) bytes of one communicator never exceed ``pool_bytes``
  (config ``comm.staging_pool_mib``; default :attr:`MPIComm.POOL_BYTES`, 4 GiB). A buffer that would
  pass it first frees idle slots (no message in flight); if that is not enough - many large
  messages in flight at once, such as Lamina's prompt-KV hand-over, which posts every layer - the
  message is staged through a *transient* pageable host buffer of its exact size, dropped when the
  message completes (or, for a collective's slot, at its next use). Nothing waits, so no ordering
  of sends and receives can deadlock on the pool; the copies of a transient buffer are slower
  (pageable). ``staging_stats`` counts them (``transient``, ``transient_bytes``, ``evicted``) and
  the first one per communicator warns once.

Every buffer handed to MPI passes :meth:`MPIComm._mpi_buf`, which refuses a device buffer when
MPI is not CUDA-aware: that would segfault, uncatchably, on every rank.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from mpi4py import MPI

from hpcattn.comm.base import Comm, Counters, Request

_OPS = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}


class _HostBuffer:
    def __init__(self, nbytes: int, pinned: bool, transient: bool = False):
        self.nbytes = nbytes
        self.data = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        self.event = None                 # CUDA event after the last async copy that reads it
        self.transient = transient        # over the pool's bound: pageable, dropped after its message

    def ready(self) -> None:
        if self.event is not None:
            self.event.synchronize()
            self.event = None

    def view(self, like: torch.Tensor) -> torch.Tensor:
        n = like.numel() * like.element_size()
        return self.data[:n].view(like.dtype).view(like.shape)


class MPIComm(Comm):
    """mpi4py communicator over a group.

    Args:
        mpi_comm: the mpi4py communicator of the group.
        counters: shared byte counters.
        gpu_aware: hand device buffers to MPI directly (only if the library is CUDA-aware).
        is_device: predicate "this tensor lives in device memory". Tests inject a fake one to
            exercise the staging logic with CPU tensors.
    """

    POOL_BYTES = 4 << 30      # default bound of one communicator's pooled host bytes (module docstring)

    def __init__(self, mpi_comm, counters: Counters, *, gpu_aware: bool = False,
                 is_device: Callable[[torch.Tensor], bool] | None = None, pool_bytes: int | None = None):
        super().__init__(mpi_comm, counters)
        self.gpu_aware = gpu_aware
        self.is_device = is_device or (lambda t: t.device.type != "cpu")
        self._pool: dict[str, _HostBuffer] = {}
        self._inflight: set[str] = set()                 # slots of point-to-point messages in flight
        self.pool_bytes = self.POOL_BYTES if pool_bytes is None else pool_bytes
        self.staging_stats = {"transient": 0, "transient_bytes": 0, "evicted": 0}
        self.transport = "mpi_device" if gpu_aware else "mpi_staged"

    # -- buffers -------------------------------------------------------------------------------
    def _mpi_buf(self, t: torch.Tensor) -> torch.Tensor:
        """The only way a tensor reaches MPI: never a device pointer unless MPI is CUDA-aware."""
        if self.is_device(t) and not self.gpu_aware:
            raise RuntimeError("internal error: a device buffer would reach a non-CUDA-aware MPI")
        if not t.is_contiguous():
            raise ValueError("communication buffers must be contiguous")
        return t

    @staticmethod
    def _raw(t: torch.Tensor) -> torch.Tensor:
        """``t``'s bytes as a flat uint8 view (point-to-point pieces: at most CHUNK bytes each)."""
        return t.reshape(-1).view(torch.uint8)

    @classmethod
    def _bytes(cls, t: torch.Tensor, unit: int | None = None, parts: int = 1) -> torch.Tensor:
        """Raw data view of ``t`` for a collective, typed by the call, not by the buffer.

        ``unit`` is the byte count of one rank's piece (default: ``t``'s size), ``parts`` how many
        pieces the largest buffer of the call holds (allgather: the group size, for both its send
        and its receive view). The element size depends on ``unit`` and ``parts`` only, which
        every rank and both buffers of a call share: bytes while the call's largest buffer is
        below 2**31 bytes, else the largest of 8, 4, 2 bytes dividing ``unit``, so that counts
        stay below 2**31 for messages up to 16 GiB (MPI libraries without large-count support).
        (Choosing by each buffer's own size gave one allgather a 2340-byte uint8 send view and an
        int64 receive view: a rank state with an odd element count, e.g. 9 query heads.)
        """
        flat = cls._raw(t)
        unit = flat.numel() if unit is None else unit
        if unit * parts < 2 ** 31:
            return flat
        for size, dtype in ((8, torch.int64), (4, torch.int32), (2, torch.int16)):
            if unit % size == 0:
                return flat.view(dtype)
        return flat

    CHUNK = 1 << 30           # point-to-point messages are split into <= 1 GiB pieces

    def _p2p(self, send: torch.Tensor, dest: int, recv: torch.Tensor, source: int) -> list:
        """Post Irecv/Isend pairs in <= CHUNK pieces; returns the requests."""
        sb, rb = self._raw(self._mpi_buf(send)), self._raw(self._mpi_buf(recv))
        step = self.CHUNK // sb.element_size()
        reqs = []
        for i, a in enumerate(range(0, max(sb.numel(), 1), step)):
            reqs.append(self.mpi.Irecv(rb[a:a + step], source=source, tag=100 + i))
            reqs.append(self.mpi.Isend(sb[a:a + step], dest=dest, tag=100 + i))
        return reqs

    def _host(self, slot: str, like: torch.Tensor) -> _HostBuffer:
        """The slot's host buffer, at least ``like``'s size, with no copy pending on it; within the
        pool's bound, or else transient (module docstring)."""
        nbytes = like.numel() * like.element_size()
        buf = self._pool.get(slot)
        if buf is not None:
            buf.ready()
            if buf.transient:
                del self._pool[slot]
                buf = None
        if buf is None or buf.nbytes < nbytes:
            grown = nbytes if buf is None else max(nbytes, buf.nbytes * 3 // 2)
            pinned = torch.cuda.is_available() and like.device.type == "cuda"
            if not self._make_room(grown - (buf.nbytes if buf is not None else 0), slot):
                if buf is not None:                      # the slot's small buffer goes too
                    del self._pool[slot]
                self._pool[slot] = buf = _HostBuffer(nbytes, pinned=False, transient=True)
                self._transient(nbytes)
                return buf
            buf = _HostBuffer(grown, pinned=pinned)
            self._pool[slot] = buf
        return buf

    def _pooled(self) -> int:
        return sum(b.nbytes for b in self._pool.values() if not b.transient)

    def _make_room(self, extra: int, slot: str) -> bool:
        """Can ``extra`` more pooled bytes fit the bound? Frees idle slots (not ``slot``, no message
        in flight) until they do; False if they cannot."""
        if self._pooled() + extra <= self.pool_bytes:
            return True
        for key in [k for k, b in self._pool.items() if k != slot and k not in self._inflight and not b.transient]:
            self._pool.pop(key).ready()
            self.staging_stats["evicted"] += 1
            if self._pooled() + extra <= self.pool_bytes:
                return True
        return False

    def _transient(self, nbytes: int) -> None:
        st = self.staging_stats
        if not st["transient"]:
            warnings.warn(f"staged MPI: the pinned host pool's bound ({self.pool_bytes} bytes) is reached with "
                          f"messages in flight: a {nbytes}-byte message goes through a pageable host buffer "
                          f"(slower copies; counted in staging_stats)", RuntimeWarning, stacklevel=3)
        st["transient"] += 1
        st["transient_bytes"] += nbytes

    def _release(self, key: str) -> None:
        """A point-to-point message's slot is free again (a transient buffer is dropped)."""
        self._inflight.discard(key)
        buf = self._pool.get(key)
        if buf is not None and buf.transient:
            buf.ready()
            del self._pool[key]

    def _staged(self, t: torch.Tensor) -> bool:
        return self.is_device(t) and not self.gpu_aware

    def _sync(self, t: torch.Tensor) -> None:
        if t.device.type == "cuda":
            torch.cuda.current_stream(t.device).synchronize()

    def _to_host(self, t: torch.Tensor, slot: str) -> torch.Tensor:
        """Copy device tensor into its pinned host buffer and wait for the copy."""
        h = self._host(slot, t).view(t)
        h.copy_(t, non_blocking=True)
        self._sync(t)
        return h

    def _from_host(self, h: torch.Tensor, t: torch.Tensor, slot: str) -> None:
        """Queue the copy host -> device on the current stream; guard the host buffer with an event."""
        t.copy_(h, non_blocking=True)
        if t.device.type == "cuda":
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(t.device))
            self._pool[slot].event = ev

    # -- collectives ---------------------------------------------------------------------------
    def allreduce(self, t, op="sum"):
        self._check_reducible(t)
        self.counters.add(t.numel() * t.element_size())
        if self._staged(t):
            h = self._to_host(t, "allreduce")
            self.mpi.Allreduce(MPI.IN_PLACE, self._mpi_buf(h), op=_OPS[op])
            self._from_host(h, t, "allreduce")
        else:
            self._sync(t)
            self.mpi.Allreduce(MPI.IN_PLACE, self._mpi_buf(t), op=_OPS[op])
        return t

    def reduce(self, t, op="sum", root=0):
        self._check_reducible(t)
        self.counters.add(t.numel() * t.element_size())
        staged = self._staged(t)
        buf = self._to_host(t, "reduce") if staged else t
        if not staged:
            self._sync(t)
        if self.rank == root:
            self.mpi.Reduce(MPI.IN_PLACE, self._mpi_buf(buf), op=_OPS[op], root=root)
        else:
            self.mpi.Reduce(self._mpi_buf(buf), None, op=_OPS[op], root=root)
        if staged and self.rank == root:
            self._from_host(buf, t, "reduce")
        return t

    def allgather(self, t):
        t = t.contiguous()
        self.counters.add(t.numel() * t.element_size())
        out = torch.empty((self.size,) + tuple(t.shape), dtype=t.dtype, device=t.device)
        if self._staged(t):
            h = self._to_host(t, "allgather_in")
            ho = self._host("allgather_out", out).view(out)
            nb = h.numel() * h.element_size()
            self.mpi.Allgather(self._bytes(self._mpi_buf(h), nb, self.size),
                               self._bytes(self._mpi_buf(ho), nb, self.size))
            self._from_host(ho, out, "allgather_out")
        else:
            self._sync(t)
            nb = t.numel() * t.element_size()
            self.mpi.Allgather(self._bytes(self._mpi_buf(t), nb, self.size),
                               self._bytes(self._mpi_buf(out), nb, self.size))
        return out

    def broadcast(self, t, root=0):
        self.counters.add(t.numel() * t.element_size())
        if self._staged(t):
            h = self._to_host(t, "bcast") if self.rank == root else self._host("bcast", t).view(t)
            self.mpi.Bcast(self._bytes(self._mpi_buf(h)), root=root)
            if self.rank != root:
                self._from_host(h, t, "bcast")
        else:
            self._sync(t)
            self.mpi.Bcast(self._bytes(self._mpi_buf(t)), root=root)
        return t

    def sendrecv_start(self, send, dest, recv, source):
        self.counters.add(send.numel() * send.element_size())
        if self._staged(send):
            # two receive slots alternate, so a ring can post step i+1 while step i's copy runs
            slot = f"recv{getattr(self, '_flip', 0)}"
            self._flip = 1 - getattr(self, "_flip", 0)
            hs = self._to_host(send, "send")
            hr = self._host(slot, recv).view(recv)
            reqs = self._p2p(hs, dest, hr, source)

            def wait():
                MPI.Request.Waitall(reqs)
                self._from_host(hr, recv, slot)
            return Request(wait)
        self._sync(send)
        reqs = self._p2p(send, dest, recv, source)
        return Request(lambda: MPI.Request.Waitall(reqs))


    # -- point to point -----------------------------------------------------------------------
    P2P_TAG_BASE, P2P_TAGS, P2P_CHUNKS = 1000, 100, 64   # MPI tag = base + tag * chunks + piece

    def _pieces(self, t: torch.Tensor, tag: int):
        if not 0 <= tag < self.P2P_TAGS:
            raise ValueError(f"internal error: point-to-point tag {tag} outside [0, {self.P2P_TAGS})")
        b = self._raw(self._mpi_buf(t))
        step = self.CHUNK // b.element_size()
        starts = range(0, max(b.numel(), 1), step)
        if len(starts) > self.P2P_CHUNKS:
            raise ValueError(f"internal error: a {t.numel() * t.element_size()}-byte message exceeds "
                             f"{self.P2P_CHUNKS} pieces of {self.CHUNK} bytes")
        base = self.P2P_TAG_BASE + tag * self.P2P_CHUNKS
        return [(b[a:a + step], base + i) for i, a in enumerate(starts)]

    def _p2p_host(self, like: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """A pooled host buffer for one point-to-point message, not used by a message in flight
        (slots ``p2p0``, ``p2p1``, ...; released by the message's ``wait``)."""
        i = 0
        while f"p2p{i}" in self._inflight:
            i += 1
        key = f"p2p{i}"
        self._inflight.add(key)
        return self._host(key, like).view(like), key

    def isend(self, t, dest, tag):
        self.counters.add(t.numel() * t.element_size())
        key = None
        if self._staged(t):
            h, key = self._p2p_host(t)
            h.copy_(t, non_blocking=True)
            self._sync(t)
            t = h
        else:
            self._sync(t)
        reqs = [self.mpi.Isend(piece, dest=dest, tag=mtag) for piece, mtag in self._pieces(t, tag)]

        def wait():
            MPI.Request.Waitall(reqs)
            if key is not None:
                self._release(key)
        return Request(wait)

    def irecv(self, t, source, tag):
        if self._staged(t):
            h, key = self._p2p_host(t)
            reqs = [self.mpi.Irecv(piece, source=source, tag=mtag) for piece, mtag in self._pieces(h, tag)]

            def wait():
                MPI.Request.Waitall(reqs)
                self._from_host(h, t, key)
                self._release(key)
            return Request(wait)
        reqs = [self.mpi.Irecv(piece, source=source, tag=mtag) for piece, mtag in self._pieces(t, tag)]
        return Request(lambda: MPI.Request.Waitall(reqs))


class MPIHostComm(MPIComm):
    """The mpi backend on CPU ranks: every tensor is a host tensor."""

    def __init__(self, mpi_comm, counters: Counters):
        super().__init__(mpi_comm, counters, gpu_aware=False)
        self.transport = "mpi_host"

"""The ``nccl`` backend (and ``gloo``, its CPU stand-in): torch.distributed bootstrapped from MPI.

MPI stays the launcher and control plane: rank 0 picks an address and a free port and MPI
broadcasts them; every rank then joins the torch.distributed process group. Device data of the
methods then moves through NCCL (GPU buffers stay on the GPU); host objects still go over MPI.

``gloo`` runs the very same code path on CPU ranks, so CI exercises the bootstrap, the sub-groups
and the batched point-to-point calls without a GPU.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from hpcattn.comm.base import Comm, Counters, Request

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _address() -> str:
    if os.environ.get("HPCATTN_MASTER_ADDR"):
        return os.environ["HPCATTN_MASTER_ADDR"]
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def init_process_group(world_mpi, backend: str, device: torch.device | None) -> None:
    """Join torch.distributed with rank/size from MPI; rank 0's address/port broadcast over MPI."""
    if dist.is_initialized():
        return
    addr_port = (_address(), _free_port()) if world_mpi.Get_rank() == 0 else None
    addr, port = world_mpi.bcast(addr_port, root=0)
    kwargs = {}
    if backend == "nccl" and device is not None:
        kwargs["device_id"] = device
    dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=world_mpi.Get_rank(),
                            world_size=world_mpi.Get_size(), timeout=timedelta(minutes=10), **kwargs)


class TorchDistComm(Comm):
    """A torch.distributed group with the same ranks as ``mpi_comm``.

    Args:
        mpi_comm: mpi4py communicator of the group (ranks in the same order as ``ranks``).
        group: the torch.distributed group (None = world).
        ranks: global ranks of the group members, indexed by group rank.
        backend: ``nccl`` or ``gloo`` (the transport name).
    """

    def __init__(self, mpi_comm, counters: Counters, group, ranks: list[int], backend: str):
        super().__init__(mpi_comm, counters)
        self.group = group
        self.ranks = ranks
        self.transport = backend

    def _g(self, r: int) -> int:
        return self.ranks[r]

    def allreduce(self, t, op="sum"):
        self._check_reducible(t)
        self.counters.add(t.numel() * t.element_size())
        dist.all_reduce(t, op=_OPS[op], group=self.group)
        return t

    def reduce(self, t, op="sum", root=0):
        self._check_reducible(t)
        self.counters.add(t.numel() * t.element_size())
        dist.reduce(t, dst=self._g(root), op=_OPS[op], group=self.group)
        return t

    def allgather(self, t):
        t = t.contiguous()
        self.counters.add(t.numel() * t.element_size())
        out = torch.empty((self.size,) + tuple(t.shape), dtype=t.dtype, device=t.device)
        if self.transport == "nccl":
            dist.all_gather_into_tensor(out, t, group=self.group)
        else:
            dist.all_gather(list(out.unbind(0)), t, group=self.group)
        return out

    def broadcast(self, t, root=0):
        self.counters.add(t.numel() * t.element_size())
        dist.broadcast(t, src=self._g(root), group=self.group)
        return t

    def sendrecv_start(self, send, dest, recv, source):
        self.counters.add(send.numel() * send.element_size())
        ops = [dist.P2POp(dist.isend, send, self._g(dest), self.group),
               dist.P2POp(dist.irecv, recv, self._g(source), self.group)]
        works = dist.batch_isend_irecv(ops)

        def wait():
            for w in works:
                w.wait()
        return Request(wait)

    def isend(self, t, dest, tag):
        self.counters.add(t.numel() * t.element_size())
        work = dist.isend(t, self._g(dest), group=self.group, tag=tag)
        return Request(work.wait)

    def irecv(self, t, source, tag):
        work = dist.irecv(t, self._g(source), group=self.group, tag=tag)
        return Request(work.wait)

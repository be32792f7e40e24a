"""Communication context: world, node-local and leaders communicators, device choice, transport.

:func:`setup` is called once per run, right after MPI init and before any CUDA allocation:

1. node-local communicator from ``MPI_Comm_split_type(SHARED)`` (or emulated nodes of
   ``comm.ranks_per_node`` ranks, for functional tests of the hierarchical paths);
2. a leaders communicator (local rank 0 of every node);
3. the GPU of this rank from its real node-local rank (``local % device_count``);
4. the backend: ``mpi`` (host, staged or device-direct), ``nccl`` or ``gloo`` bootstrapped from MPI.

All three communicators share one :class:`~hpcattn.comm.base.Counters`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from mpi4py import MPI

from hpcattn.comm import gpu_aware as _gpu_aware
from hpcattn.comm.base import Comm, Counters, Request  # noqa: F401
from hpcattn.comm.mpi import MPIComm, MPIHostComm


@dataclass
class CommContext:
    """Everything a method needs to talk to other ranks.

    ``leaders`` is None on ranks that are not their node's leader. ``node_ranks`` lists, per node,
    the world ranks of that node (same on every rank).
    """

    world: Comm
    node: Comm
    leaders: Comm | None
    device: torch.device
    backend: str
    transport: str
    gpu_aware: bool
    gpu_aware_method: str
    local_rank: int
    node_index: int
    node_ranks: list[list[int]]
    counters: Counters = field(default_factory=Counters)
    splits: dict = field(default_factory=dict, repr=False)   # colors -> CommContext (:func:`split`)

    @property
    def rank(self) -> int:
        return self.world.rank

    @property
    def size(self) -> int:
        return self.world.size

    def sync(self) -> None:
        """Wait for this rank's device work (no-op on CPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def barrier(self) -> None:
        """Device sync, then a host barrier of the world."""
        self.sync()
        self.world.barrier()

    IDLE_POLL_S = (1e-4, 5e-3)     # idle_barrier's first and longest sleep between tests

    def idle_barrier(self) -> None:
        """Device sync, then a barrier of the world that waits asleep: ``MPI_Ibarrier`` tested
        after sleeps doubling from 0.1 ms to 5 ms. Around work one rank does alone (the
        single-rank ``local`` baseline, rank 0's reference), so that the waiting ranks leave that
        rank its cores: a blocking MPI call busy-polls (MPICH's default) and, with more ranks
        than cores, slowed the lone rank 2.7x. Not for timed distributed steps (exits skew by up
        to a sleep)."""
        self.sync()
        req = self.world.mpi.Ibarrier()
        pause, longest = self.IDLE_POLL_S
        while not req.Test():
            time.sleep(pause)
            pause = min(2 * pause, longest)


def real_local_rank(world_mpi) -> int:
    node = world_mpi.Split_type(MPI.COMM_TYPE_SHARED, key=world_mpi.Get_rank())
    r = node.Get_rank()
    node.Free()
    return r


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "mpi"
    return backend


def setup(world_mpi, *, device_kind: str, backend: str = "auto", gpu_aware_setting: str = "auto",
          ranks_per_node: int | None = None, staging_pool_bytes: int | None = None) -> CommContext:
    """Build the communication context of this rank (collective over ``world_mpi``).
    ``staging_pool_bytes``: the bound of each staged communicator's pinned pool (``comm.staging_pool_mib``;
    default :attr:`hpcattn.comm.mpi.MPIComm.POOL_BYTES`)."""
    rank = world_mpi.Get_rank()
    local_real = real_local_rank(world_mpi)
    if device_kind == "cuda":
        device = torch.device("cuda", local_real % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if ranks_per_node:
        node_mpi = world_mpi.Split(rank // ranks_per_node, rank)
    else:
        node_mpi = world_mpi.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local = node_mpi.Get_rank()
    leaders_mpi = world_mpi.Split(0 if local == 0 else MPI.UNDEFINED, rank)
    leader_of = world_mpi.allgather(rank if local == 0 else None)
    node_of = world_mpi.allgather(node_mpi.allgather(rank)[0])      # each rank's node leader
    leaders_sorted = [r for r in leader_of if r is not None]
    node_ranks = [[r for r, lead in enumerate(node_of) if lead == ld] for ld in leaders_sorted]
    node_index = leaders_sorted.index(node_of[rank])

    probed = _gpu_aware.probe(world_mpi)
    aware, method = _gpu_aware.resolve(gpu_aware_setting, probed)
    backend = resolve_backend(backend, device)
    counters = Counters()

    if backend == "mpi":
        if device.type == "cpu":
            make = lambda c: MPIHostComm(c, counters)  # noqa: E731
        else:
            make = lambda c: MPIComm(c, counters, gpu_aware=aware, pool_bytes=staging_pool_bytes)  # noqa: E731
        world, node = make(world_mpi), make(node_mpi)
        leaders = make(leaders_mpi) if leaders_mpi != MPI.COMM_NULL else None
    else:
        import torch.distributed as dist

        from hpcattn.comm.torchdist import TorchDistComm, init_process_group

        init_process_group(world_mpi, backend, device if device.type == "cuda" else None)
        node_groups = [dist.new_group(rs) for rs in node_ranks]   # collective: same order everywhere
        leaders_group = dist.new_group(leaders_sorted)
        world = TorchDistComm(world_mpi, counters, None, list(range(world_mpi.Get_size())), backend)
        node = TorchDistComm(node_mpi, counters, node_groups[node_index], node_ranks[node_index], backend)
        leaders = (TorchDistComm(leaders_mpi, counters, leaders_group, leaders_sorted, backend)
                   if leaders_mpi != MPI.COMM_NULL else None)
    return CommContext(world=world, node=node, leaders=leaders, device=device, backend=backend,
                       transport=world.transport, gpu_aware=aware, gpu_aware_method=method,
                       local_rank=local, node_index=node_index, node_ranks=node_ranks,
                       counters=counters)


def split(ctx: CommContext, colors: list[int]) -> CommContext:
    """The context of this rank's group when world rank r joins group ``colors[r]`` (collective
    over the world; ``colors`` identical on every rank). Group ranks follow world rank order; the
    group is one node with its rank 0 as leader; counters are shared with ``ctx``. Made once per
    ``colors`` and context (NCCL groups are costly), then reused: it lives and dies with ``ctx``."""
    key = tuple(colors)
    if key not in ctx.splits:
        ctx.splits[key] = _split(ctx, colors)
    return ctx.splits[key]


def _split(ctx: CommContext, colors: list[int]) -> CommContext:
    rank = ctx.rank
    mine = [r for r, c in enumerate(colors) if c == colors[rank]]
    sub_mpi = ctx.world.mpi.Split(colors[rank], rank)
    if isinstance(ctx.world, MPIComm):
        cls = type(ctx.world)
        make = (lambda c: cls(c, ctx.counters)) if cls is MPIHostComm else \
            (lambda c: MPIComm(c, ctx.counters, gpu_aware=ctx.gpu_aware, pool_bytes=ctx.world.pool_bytes))  # noqa: E731
        world = make(sub_mpi)
    else:
        import torch.distributed as dist

        from hpcattn.comm.torchdist import TorchDistComm

        groups = {c: dist.new_group([r for r, x in enumerate(colors) if x == c]) for c in sorted(set(colors))}
        world = TorchDistComm(sub_mpi, ctx.counters, groups[colors[rank]], mine, ctx.backend)
    leaders = world if world.rank == 0 else None
    return CommContext(world=world, node=world, leaders=leaders, device=ctx.device, backend=ctx.backend,
                       transport=world.transport, gpu_aware=ctx.gpu_aware, gpu_aware_method=ctx.gpu_aware_method,
                       local_rank=world.rank, node_index=0, node_ranks=[list(range(world.size))],
                       counters=ctx.counters)


def teardown(ctx: CommContext) -> None:
    """End torch.distributed if this run started it: the nccl/gloo transport, or a method that
    needed a process group on an ``mpi`` run (the ``torch_cp`` peer)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()

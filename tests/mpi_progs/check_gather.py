"""Run under ``mpiexec -n P``: hpcattn.methods.sharding.gather_in_order moves every rank's rows
to rank 0 in global token order as raw bytes, in messages of at most ``chunk_bytes`` (here a few
bytes, so one row spans several messages), for zigzag and contiguous layouts, float32, bfloat16
and int64 rows, ranks without rows, and a wrong index set (one RuntimeError on rank 0, nobody
blocked).

usage: mpiexec -n P python -m mpi4py tests/mpi_progs/check_gather.py
"""

import torch
from mpi4py import MPI

from hpcattn import comm as comm_mod
from hpcattn.methods.sharding import gather_in_order, layout_indices

world = MPI.COMM_WORLD
ctx = comm_mod.setup(world, device_kind="cpu", backend="mpi", ranks_per_node=2)
p, r = ctx.size, ctx.rank
cases = 0
for layout, n in (("zigzag", 4 * p), ("contiguous", 5 * p + 1), ("contiguous", p - 1)):
    idx = layout_indices(layout, n, p, r)
    for dtype in (torch.float32, torch.bfloat16, torch.int64):
        for chunk in (7, 1 << 30):
            # rows (2, len, 3): value = 1000 * batch + 10 * global index + feature
            rows = (1000 * torch.arange(2)[:, None, None] + 10 * idx[None, :, None] + torch.arange(3)).to(dtype)
            has = idx.numel() > 0
            got = gather_in_order(ctx.world, idx if has else None, rows if has else None, 1, n, chunk_bytes=chunk)
            if r == 0:
                g = torch.arange(n)
                want = (1000 * torch.arange(2)[:, None, None] + 10 * g[None, :, None] + torch.arange(3)).to(dtype)
                assert got is not None and got.dtype == dtype and torch.equal(got, want), (layout, n, dtype, chunk)
            else:
                assert got is None
            cases += 1
# a wrong index set: rank 0 raises after draining every sender; the others return None
bad = torch.tensor([r, r])                                          # duplicates: not a permutation
try:
    gather_in_order(ctx.world, bad, torch.zeros(1, 2, 4), 1, 2 * p, chunk_bytes=5)
    assert r != 0, "rank 0 did not raise"
except RuntimeError as e:
    assert r == 0 and "not a permutation" in str(e), e
ctx.world.barrier()
if r == 0:
    print(f"check_gather: {cases} cases passed on {p} ranks")

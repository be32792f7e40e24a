"""Run under ``mpiexec -n P`` (P = 2 or 4): the ``torch_cp`` peer's set-up on gloo CPU ranks.

PyTorch's ``context_parallel`` must shard the peer's (B, H, N, d) copies exactly as hpcattn's
zigzag layout (so outputs are checked against the right rows), with K/V expanded to Hq heads
(``native_gqa`` off) or left at Hkv (on). The SDPA call itself needs a GPU (no CPU sharding rule):
tests/test_gpu.py runs it.

usage: mpiexec -n P python -m mpi4py tests/mpi_progs/check_torch_cp.py
"""

import torch
from mpi4py import MPI

from hpcattn import comm as comm_mod
from hpcattn.methods.sharding import layout_indices
from hpcattn.methods.torch_cp import TorchContextParallel

world = MPI.COMM_WORLD
ctx = comm_mod.setup(world, device_kind="cpu", backend="gloo")
p, r = ctx.size, ctx.rank
g = torch.Generator().manual_seed(0)
B, N, Hq, Hkv, d = 2, 16 * p, 8, 2, 4
q, k, v = torch.randn(B, N, Hq, d, generator=g), torch.randn(B, N, Hkv, d, generator=g), \
    torch.randn(B, N, Hkv, d, generator=g)
want = layout_indices("zigzag", N, p, r)
for native in (False, True):
    peer = TorchContextParallel(q, k, v, ctx, scale=0.5, causal=True, native_gqa=native)
    assert torch.equal(peer.index, want), (r, peer.index.tolist(), want.tolist())
    assert torch.equal(peer.q, q[:, want].transpose(1, 2)), "q shard"
    kk = k[:, want].transpose(1, 2)
    if not native:
        kk = kk.repeat_interleave(Hq // Hkv, dim=1)
    assert torch.equal(peer.k, kk) and peer.k.shape == (B, Hq if not native else Hkv, N // p, d), "k shard"
    assert q.shape == (B, N, Hq, d), "the caller's tensors are left alone"
world.barrier()
if r == 0:
    print(f"torch_cp set-up checks passed on {p} ranks")

"""Run under ``mpiexec -n P``: tree decode, ring decode and ring prefill on real ranks must equal
the single-process float64 reference. Exits non-zero (MPI_Abort through ``python -m mpi4py``) on
the first mismatch or NaN.

usage: mpiexec -n P python -m mpi4py tests/mpi_progs/check_methods.py BACKEND [RANKS_PER_NODE]
"""

import sys

import torch
from mpi4py import MPI

from hpcattn import comm as comm_mod
from hpcattn.jobs.check import max_err
from hpcattn.kernels import attn_reference, select_kernel
from hpcattn.methods import ring_decode, ring_prefill, tree_decode
from hpcattn.methods.sharding import layout_indices, shard_lengths
from tests.shards import ragged_kv_shard

TOL = 1e-10
backend = sys.argv[1]
rpn = int(sys.argv[2]) if len(sys.argv) > 2 else None
world = MPI.COMM_WORLD
ctx = comm_mod.setup(world, device_kind="cpu", backend=backend, ranks_per_node=rpn)
p, r = ctx.size, ctx.rank
kern = select_kernel("torch_ref", "cpu", torch.float64, 16)
checks = 0


def same_everywhere(t):
    g = world.allgather(t)
    return all(torch.equal(g[0], x) for x in g)


def expect(name, got, want):
    global checks
    out, lse = got
    ro, rl = want
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), f"{name}: NaN"
    eo, el = max_err(out, ro), max_err(lse, rl)
    assert eo < TOL and el < TOL, f"{name} (p={p}, rank {r}): out err {eo:.3e}, lse err {el:.3e}"
    checks += 1


g = torch.Generator().manual_seed(7)
rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731

# ---- decode: B=3, ragged lengths with empty shards (N < p for one sequence), GQA 4 -------------
for B, hq, hkv, lengths in [(3, 8, 2, [37, 2, 0]), (1, 4, 4, [64]), (2, 8, 1, [5, 129])]:
    d = 16
    N = max(lengths)
    q, K, V = rnd(B, 1, hq, d), rnd(B, N, hkv, d), rnd(B, N, hkv, d)
    ref = attn_reference(q, K, V, scale=0.3, k_lengths=torch.tensor(lengths))
    k, v, mine = ragged_kv_shard(K, V, lengths, p, r)
    for reduction in ("allreduce", "allgather"):
        for topology in ("flat", "hierarchical"):
            res = tree_decode(q, k, v, ctx, kernel=kern, scale=0.3, k_lengths=mine,
                              reduction=reduction, topology=topology)
            expect(f"tree {reduction}/{topology} B={B} lengths={lengths}", res, ref)
            assert same_everywhere(res[0]), "tree output differs between ranks"
    allshards = [shard_lengths(lengths, p, i) for i in range(p)]
    expect(f"ring decode B={B}", ring_decode(q, k, v, ctx, kernel=kern, scale=0.3, shard_lengths=allshards), ref)

# ---- prefill: zigzag / contiguous, causal / full, GQA 1 and 4 -----------------------------------
for hq, hkv in ((4, 4), (8, 2)):
    for causal in (True, False):
        for layout in ("zigzag", "contiguous"):
            N = 4 * p * 3 if layout == "zigzag" else 4 * p * 3 + 1   # contiguous: ragged shards
            B, d = 2, 16
            q, K, V = rnd(B, N, hq, d), rnd(B, N, hkv, d), rnd(B, N, hkv, d)
            ro, rl = attn_reference(q, K, V, scale=0.25, causal="square" if causal else "none")
            idx = layout_indices(layout, N, p, r)
            out, lse = ring_prefill(q[:, idx], K[:, idx], V[:, idx], ctx, kernel=kern, scale=0.25,
                                    causal=causal, layout=layout)
            expect(f"ring prefill {layout} causal={causal} G={hq // hkv}", (out, lse), (ro[:, idx], rl[:, :, idx]))

total = world.allreduce(checks)
comm_mod.teardown(ctx)
if r == 0:
    print(f"check_methods: {backend} p={p} rpn={rpn}: {total} checks passed on {p} ranks")

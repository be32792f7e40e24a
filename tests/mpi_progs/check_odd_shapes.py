"""Run under ``mpiexec -n P``: odd element counts over every transport and every method.

Rank states with an odd number of values (B x Hq x Sq x (d+1), e.g. SmolLM2's 9 query heads) once
crashed the ``mpi`` transport's allgather (its send and receive views got different element
types). This program widens the grids the way flash-attention's tests do - odd head counts
(Hq 9 / Hkv 3, Hq 5 / Hkv 1), head dims 59, 64, 80, 96, 111, odd lengths and batches - in float32
(4-byte elements: an odd count is not a whole number of 8-byte words), over three transports in
one launch: ``mpi_host`` (CPU ranks), ``mpi_staged`` (the pinned-buffer path, with a fake device
predicate as in tests/test_staging.py) and ``gloo`` (the nccl code path on CPU). Each transport
first moves odd-sized raw messages through every call (allgather, broadcast, sendrecv,
isend/irecv, allreduce, reduce), then runs tree decode (allgather/allreduce x flat/hierarchical),
ring decode, ring prefill (zigzag/contiguous), Star's query pass and APB against single-process
references. Contexts are tiny: the whole grid is a few seconds per launch.

usage: mpiexec -n P python -m mpi4py tests/mpi_progs/check_odd_shapes.py
"""

import torch
from mpi4py import MPI

from hpcattn import comm as comm_mod
from hpcattn.comm.mpi import MPIComm
from hpcattn.jobs.check import max_err
from hpcattn.kernels import attn_reference, select_kernel
from hpcattn.methods import ring_decode, ring_prefill, tree_decode
from hpcattn.methods.apb import APBParams, apb_prefill, score_query_aware
from hpcattn.methods.sharding import layout_indices, shard_lengths
from hpcattn.methods.star import star_blocks, star_query
from tests.approx_sim import simulate_apb, simulate_star_query
from tests.shards import ragged_kv_shard

TOL = 1e-4
world = MPI.COMM_WORLD
p, r = world.Get_size(), world.Get_rank()
checks = 0
# (B, Hq, Hkv, d, decode lengths): every head count and head dim of the grid, odd batches and lengths
SHAPES = [(1, 9, 3, 64, [37]), (3, 5, 1, 59, [13, 1, 29]), (2, 9, 3, 111, [21, 5]),
          (1, 5, 1, 80, [11]), (3, 9, 3, 96, [3, 17, 9])]


def expect(name, got, want, tol=TOL):
    global checks
    err = max(max_err(a.double(), b.double()) for a, b in zip(got, want))
    assert all(not torch.isnan(a).any() for a in got), f"{name}: NaN"
    assert err < tol, f"{name} (p={p}, rank {r}): err {err:.3e}"
    checks += 1


def staged(ctx):
    """The same context with MPIComm's staging path: every tensor but its own pool is 'device'."""
    def make(c):
        holder = {}

        def is_device(t):
            ptr = t.untyped_storage().data_ptr()
            return not any(ptr == b.data.untyped_storage().data_ptr() for b in holder["c"]._pool.values())
        holder["c"] = MPIComm(c.mpi, ctx.counters, gpu_aware=False, is_device=is_device)
        return holder["c"]
    ctx.world, ctx.node = make(ctx.world), make(ctx.node)
    ctx.leaders = make(ctx.leaders) if ctx.leaders is not None else None
    ctx.transport = "mpi_staged"
    return ctx


def raw_messages(ctx, label):
    """Odd-sized messages of every dtype through every call of the Comm interface."""
    w = ctx.world
    for dtype in (torch.uint8, torch.bfloat16, torch.float32, torch.float64):
        for n in (1, 3, 5, 7, 585):
            mine = (torch.arange(n) * (p + 1) + r).to(dtype)
            got = w.allgather(mine)
            assert torch.equal(got, torch.stack([(torch.arange(n) * (p + 1) + i).to(dtype) for i in range(p)])), \
                f"{label} allgather {dtype} n={n}"
            b = mine.clone() if r == p - 1 else torch.zeros(n, dtype=dtype)
            assert torch.equal(w.broadcast(b, root=p - 1), (torch.arange(n) * (p + 1) + p - 1).to(dtype)), \
                f"{label} broadcast {dtype} n={n}"
            recv = torch.zeros(n, dtype=dtype)
            w.sendrecv_start(mine, (r + 1) % p, recv, (r - 1) % p).wait()
            assert torch.equal(recv, (torch.arange(n) * (p + 1) + (r - 1) % p).to(dtype)), f"{label} sendrecv"
            recv2 = torch.zeros(n, dtype=dtype)
            reqs = [w.irecv(recv2, (r + 1) % p, tag=3), w.isend(mine, (r - 1) % p, tag=3)]
            for q in reqs:
                q.wait()
            assert torch.equal(recv2, (torch.arange(n) * (p + 1) + (r + 1) % p).to(dtype)), f"{label} isend/irecv"
            if dtype in (torch.float32, torch.float64):
                s = w.allreduce(mine.clone())
                assert torch.equal(s, sum((torch.arange(n) * (p + 1) + i).to(dtype) for i in range(p)))
                red = w.reduce(mine.clone(), root=0)
                assert r != 0 or torch.equal(red, s), f"{label} reduce"
    global checks
    checks += 1


def methods(ctx, label):
    g = torch.Generator().manual_seed(5)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float32)  # noqa: E731
    for B, hq, hkv, d, lengths in SHAPES:
        kern = select_kernel("torch_ref", "cpu", torch.float32, d)
        scale = d ** -0.5
        tag = f"{label} B={B} Hq={hq} Hkv={hkv} d={d}"
        # decode: ragged odd lengths, some shards empty
        N = max(lengths)
        q, K, V = rnd(B, 1, hq, d), rnd(B, N, hkv, d), rnd(B, N, hkv, d)
        ref = attn_reference(q.double(), K.double(), V.double(), scale=scale, k_lengths=torch.tensor(lengths))
        k, v, mine = ragged_kv_shard(K, V, lengths, p, r)
        for reduction in ("allgather", "allreduce"):
            for topology in ("flat", "hierarchical"):
                res = tree_decode(q, k, v, ctx, kernel=kern, scale=scale, k_lengths=mine,
                                  reduction=reduction, topology=topology)
                expect(f"tree {reduction}/{topology} {tag}", res, ref)
        allshards = [shard_lengths(lengths, p, i) for i in range(p)]
        expect(f"ring decode {tag}", ring_decode(q, k, v, ctx, kernel=kern, scale=scale, shard_lengths=allshards),
               ref)
        # prefill: odd lengths (zigzag needs 2p chunks; contiguous gets ragged shards)
        for layout, n in (("zigzag", 2 * p * 3), ("contiguous", 2 * p * 3 + 1)):
            q2, k2, v2 = rnd(B, n, hq, d), rnd(B, n, hkv, d), rnd(B, n, hkv, d)
            ro, rl = attn_reference(q2.double(), k2.double(), v2.double(), scale=scale, causal="square")
            idx = layout_indices(layout, n, p, r)
            res = ring_prefill(q2[:, idx], k2[:, idx], v2[:, idx], ctx, kernel=kern, scale=scale, causal=True,
                               layout=layout)
            expect(f"ring prefill {layout} {tag}", res, (ro[:, idx], rl[:, :, idx]))
        # Star's query pass and APB: block lb = 5 per rank, 3 query rows
        lb, ql = 5, 3
        n = lb * p
        q3, k3, v3 = rnd(B, n, hq, d), rnd(B, n, hkv, d), rnd(B, n, hkv, d)
        qq, kq, vq = rnd(B, ql, hq, d), rnd(B, ql, hkv, d), rnd(B, ql, hkv, d)
        blocks = star_blocks(n, lb, p)[r]
        kc, vc = torch.cat([k3[:, a:b] for a, b in blocks], 1), torch.cat([v3[:, a:b] for a, b in blocks], 1)
        res = star_query(qq, kq, vq, kc, vc, ctx, kernel=kern, scale=scale, is_last=(r == p - 1))
        want = simulate_star_query(*(x.double() for x in (qq, kq, vq, k3, v3)), p, lb, scale)
        expect(f"star query pass {tag}", res, want)
        prm = APBParams(la=4, lp=3, query_offset=1)
        comp = lambda ql_, kl, vl, rank: score_query_aware(kl, qq)  # noqa: E731
        o, _, _ = apb_prefill(q3, k3, v3, qq, kq, vq, ctx, prm, kernel=kern, scale=scale, compressor=comp)
        want = simulate_apb(q3, k3, v3, qq, kq, vq, p, prm, scale, comp)
        expect(f"apb {tag}", (o,), (want[:, r * lb:(r + 1) * lb],))


for transport in ("mpi_host", "mpi_staged", "gloo"):
    backend = "gloo" if transport == "gloo" else "mpi"
    ctx = comm_mod.setup(world, device_kind="cpu", backend=backend, ranks_per_node=2)
    if transport == "mpi_staged":
        ctx = staged(ctx)
    assert ctx.transport == transport, (ctx.transport, transport)
    raw_messages(ctx, transport)
    methods(ctx, transport)

total = world.allreduce(checks)
comm_mod.teardown(ctx)
if r == 0:
    print(f"check_odd_shapes: {total} checks passed on {p} ranks (mpi_host, mpi_staged, gloo)")

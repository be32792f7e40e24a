"""Run under ``mpiexec -n P``: distributed Star (phase 1 and 2) and APB (three compressors,
ablation switches) equal their single-process explicit-mask simulations in float64.

usage: mpiexec -n P python -m mpi4py tests/mpi_progs/check_approx.py HEADS_FILE
"""

import sys

import torch
from mpi4py import MPI

from hpcattn import comm as comm_mod
from hpcattn.kernels import select_kernel
from hpcattn.methods.apb import APBParams, RetainingHeads, apb_prefill, score_query_aware, score_random
from hpcattn.methods.star import star_blocks, star_phase1, star_query
from tests.approx_sim import simulate_apb, simulate_star, simulate_star_query

world = MPI.COMM_WORLD
ctx = comm_mod.setup(world, device_kind="cpu", backend="mpi")
p, r = ctx.size, ctx.rank
kern = select_kernel("torch_ref", "cpu", torch.float64, 16)
g = torch.Generator().manual_seed(11)
B, Hq, Hkv, d, lb, ql = 2, 8, 2, 16, 24, 5
n = lb * p
rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
q, k, v = rnd(B, n, Hq, d), rnd(B, n, Hkv, d), rnd(B, n, Hkv, d)
qq, kq, vq = rnd(B, ql, Hq, d), rnd(B, ql, Hkv, d), rnd(B, ql, Hkv, d)
scale = d ** -0.5
checks = 0


def close(name, a, b, tol=1e-10):
    global checks
    err = float((a - b).abs().max())
    assert not torch.isnan(a).any() and err < tol, f"{name} (p={p}, rank {r}): err {err:.2e}"
    checks += 1


# Star: block = n/p (APB's setting) and quarter blocks (Star README), anchor = block and smaller
for block, anchor in ((lb, lb), (n // 4, n // 4), (lb, 7)):
    mine = star_blocks(n, block, p)[r]
    o, _ = star_phase1(q, k, v, blocks=mine, anchor=anchor, kernel=kern, scale=scale)
    ref = simulate_star(q, k, v, p, block, anchor, scale)
    if mine:
        close(f"star phase 1 block={block} anchor={anchor}", o, torch.cat([ref[:, a:b] for a, b in mine], 1))
    for quirk in (False, True):
        kc = torch.cat([k[:, a:b] for a, b in mine], 1) if mine else k[:, :0]
        vc = torch.cat([v[:, a:b] for a, b in mine], 1) if mine else v[:, :0]
        assert star_blocks(n, block, p)[p - 1], "these settings give every rank a block: the host is the last"
        oq, lq = star_query(qq, kq, vq, kc, vc, ctx, kernel=kern, scale=scale, is_last=(r == p - 1), quirk=quirk)
        ro, rl = simulate_star_query(qq, kq, vq, k, v, p, block, scale, quirk=quirk)
        close(f"star phase 2 quirk={quirk} block={block}", oq, ro)
        close(f"star phase 2 lse quirk={quirk}", lq, rl)

# APB: compressors and ablations
heads = RetainingHeads(sys.argv[1], r"layers\.(\d+)\.(fc1|fc2)\.weight", Hq, Hkv, d, [0])
compressors = {
    "query_aware": lambda ql_, kl, vl, rank: score_query_aware(kl, qq),
    "random": lambda ql_, kl, vl, rank: score_random((B, ql_.shape[1], Hkv), 3, rank, "cpu"),
    "retaining_heads": lambda ql_, kl, vl, rank: heads.score(0, ql_, kl, vl),
}
settings = [APBParams(la=8, lp=4, query_offset=2), APBParams(la=8, lp=4, query_in_anchor=False),
            APBParams(la=0, lp=6), APBParams(la=8, lp=0, query_offset=1), APBParams(la=6, lp=5, pool=1)]
for name, comp in compressors.items():
    for prm in settings:
        o, _, idx = apb_prefill(q, k, v, qq, kq, vq, ctx, prm, kernel=kern, scale=scale, compressor=comp)
        ref = simulate_apb(q, k, v, qq, kq, vq, p, prm, scale, comp)
        close(f"apb {name} {prm}", o, ref[:, r * lb:(r + 1) * lb])

total = world.allreduce(checks)
comm_mod.teardown(ctx)
if r == 0:
    print(f"check_approx: {total} checks passed on {p} ranks")

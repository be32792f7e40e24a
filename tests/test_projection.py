"""The P-host projection runs the real per-host work: the emulated hosts' outputs equal the exact
reference (ring) and the explicit-mask simulations (Star, APB), and the comm models behave."""

import torch

from hpcattn.jobs.projection import allgather_time, apb_hosts, ring_exposed_comm, ring_hosts, star_hosts
from hpcattn.kernels import attn_reference, select_kernel
from hpcattn.methods.apb import APBParams, score_query_aware
from tests.approx_sim import simulate_apb, simulate_star

P, B, Hq, Hkv, d, lb, ql = 4, 2, 8, 2, 16, 24, 5
g = torch.Generator().manual_seed(4)
rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
q, k, v = rnd(B, lb * P, Hq, d), rnd(B, lb * P, Hkv, d), rnd(B, lb * P, Hkv, d)
qq, kq, vq = rnd(B, ql, Hq, d), rnd(B, ql, Hkv, d), rnd(B, ql, Hkv, d)
kern = select_kernel("torch_ref", "cpu", torch.float64, d)
dev = torch.device("cpu")


def assemble(res, n):
    out = torch.zeros(B, n, Hq, d, dtype=torch.float64)
    for index, o, _, ts in res:
        out[:, index] = o
        assert len(ts) == 1 and ts[0] > 0
    return out


def test_ring_hosts_exact():
    ref, _ = attn_reference(q, k, v, scale=0.25, causal="square")
    got = assemble(ring_hosts(q, k, v, P, kernel=kern, scale=0.25, device=dev, repeats=1), lb * P)
    assert (got - ref).abs().max() < 1e-12


def test_star_hosts_equal_simulation():
    got = assemble(star_hosts(q, k, v, P, block=lb, anchor=10, kernel=kern, scale=0.25, device=dev, repeats=1), lb * P)
    assert (got - simulate_star(q, k, v, P, lb, 10, 0.25)).abs().max() < 1e-12


def test_apb_hosts_equal_simulation():
    prm = APBParams(la=8, lp=4, query_offset=1)
    comp = lambda ql_, kl, vl, r: score_query_aware(kl, qq)  # noqa: E731
    res, nbytes = apb_hosts(q, k, v, qq, kq, vq, P, prm, compressor=comp, kernel=kern, scale=0.25, device=dev,
                            repeats=1)
    ref = simulate_apb(q, k, v, qq, kq, vq, P, prm, 0.25, comp)
    assert (assemble(res, lb * P) - ref).abs().max() < 1e-12
    assert nbytes == B * 4 * Hkv * 2 * d * 8


def test_comm_models():
    assert ring_exposed_comm(1.0, 8, 10 ** 6, 1e9, 0.0) == 0.0                 # hidden behind compute
    assert abs(ring_exposed_comm(0.0, 8, 10 ** 9, 1e9, 0.0) - 7.0) < 1e-9       # fully exposed
    assert allgather_time(8, 10 ** 9, 1e9, 1e-5) == 1e-5 + 7.0 and allgather_time(1, 10, 1e9, 1.0) == 0.0

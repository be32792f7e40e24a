"""APB/Star building blocks in one process: the stock-kernel mask decomposition against the
explicit-mask reference (also in bf16 with the CPU flash kernel), and the settings errors."""

import pytest
import torch

from hpcattn.errors import ConfigError
from hpcattn.kernels import attn_reference, select_kernel
from hpcattn.methods.apb import APBParams, apb_attention, preset, validate


@pytest.mark.parametrize("backend,dtype,tol", [("torch_ref", torch.float64, 1e-12), ("cpu_flash", torch.bfloat16, None)])
@pytest.mark.parametrize("P,la,lb", [(0, 6, 17), (9, 6, 17), (12, 0, 10)])
def test_three_call_mask_equals_explicit_mask(backend, dtype, tol, P, la, lb):
    g = torch.Generator().manual_seed(P + la)
    kern = select_kernel(backend, "cpu", dtype, 32)
    q = torch.randn(2, la + lb, 8, 32, generator=g, dtype=torch.float64)
    k = torch.randn(2, la + lb, 2, 32, generator=g, dtype=torch.float64)
    v = torch.randn(2, la + lb, 2, 32, generator=g, dtype=torch.float64)
    pk = torch.randn(2, P, 2, 32, generator=g, dtype=torch.float64)
    pv = torch.randn(2, P, 2, 32, generator=g, dtype=torch.float64)
    S = la + lb
    mask = torch.zeros(lb, P + S, dtype=torch.bool)
    for t in range(lb):
        mask[t, : P + la + t + 1] = True
    ro, rl = attn_reference(q[:, la:], torch.cat([pk, k], 1), torch.cat([pv, v], 1), scale=0.2, mask=mask[None, None])
    o, l = apb_attention(*(x.to(dtype) for x in (q, k, v, pk, pv)), la, kernel=kern, scale=0.2)
    if tol is None:   # low precision: flash-attention's rule against plain same-dtype math
        bo, bl = attn_reference(q[:, la:].to(dtype), torch.cat([pk, k], 1).to(dtype),
                                torch.cat([pv, v], 1).to(dtype), scale=0.2, mask=mask[None, None])
        tol_o = 2 * (bo.double() - ro).abs().max().item() + 1e-2
        tol_l = 2 * (bl.double() - rl).abs().max().item() + 1e-2
    else:
        tol_o = tol_l = tol
    assert (o.double() - ro).abs().max().item() <= tol_o
    assert (l.double() - rl).abs().max().item() <= tol_l


@pytest.mark.parametrize("n,p,ql,prm,msg", [
    (1000, 3, 0, APBParams(la=10, lp=5), "divisible by the 3 ranks"),
    (96, 4, 10, APBParams(la=8, lp=4, query_offset=2), "smaller than query_offset"),
    (96, 4, 2, APBParams(la=8, lp=20, query_offset=2), "larger than the selectable block rows"),
    (96, 4, 2, APBParams(la=30, lp=2), "larger than the block"),
    (96, 4, 2, APBParams(la=8, lp=2, pool=4), "odd number"),
])
def test_bad_settings(n, p, ql, prm, msg):
    with pytest.raises(ConfigError, match=msg):
        validate(n, p, ql, prm)


def test_presets():
    assert preset(131072, 8) == (4096, 2048) and preset(524288, 8) == (8192, 8192)
    assert preset(131072, 2) == (16384, 8192)

"""The fused Triton merge (tree decode's all-gather merge) through Triton's CPU interpreter equals
hpcattn's merge_states, including empty shards and fully empty rows."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402

from hpcattn.kernels.lean import interpreter_shim  # noqa: E402
from hpcattn.kernels.merge import merge_states, pack_states, unpack_states  # noqa: E402
from hpcattn.kernels.merge_triton import merge_gathered  # noqa: E402

interpreter_shim()


@pytest.mark.parametrize("P,B,H,Sq,d", [(1, 1, 4, 1, 16), (2, 3, 8, 1, 32), (4, 2, 4, 3, 20), (3, 1, 32, 1, 128)])
def test_fused_merge_equals_merge_states(P, B, H, Sq, d):
    g = torch.Generator().manual_seed(P * 7 + d)
    outs = torch.randn(P, B, Sq, H, d, generator=g)
    lses = torch.randn(P, B, H, Sq, generator=g) * 5
    lses[0, 0, 0] = float("-inf")                      # an empty shard for one row
    outs[0, 0, :, 0] = 0
    if P > 1:
        lses[:, 0, 1] = float("-inf")                  # a row no rank has keys for
        outs[:, 0, :, 1] = 0
    buf = torch.stack([pack_states(outs[i], lses[i]) for i in range(P)]).contiguous()
    o, l = merge_gathered(buf, torch.float32)
    ro, rl = merge_states(*unpack_states(buf, B, Sq, H, d))
    got_o = o.view(B, H, Sq, d).transpose(1, 2)
    assert not torch.isnan(got_o).any() and not torch.isnan(l).any()
    assert torch.allclose(got_o, ro, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.isinf(l.view(B, H, Sq)), torch.isinf(rl))
    fin = torch.isfinite(rl)
    assert torch.allclose(l.view(B, H, Sq)[fin], rl[fin], atol=1e-5)


def test_fused_merge_writes_out_dtype_and_rejects_bad_buffers():
    buf = torch.randn(2, 5, 9)
    o, _ = merge_gathered(buf, torch.bfloat16)
    assert o.dtype == torch.bfloat16 and o.shape == (5, 8)
    with pytest.raises(ValueError, match="float32"):
        merge_gathered(buf.double(), torch.float32)

"""Single-process simulations of Star and APB written with explicit masks (float64 reference
math, no stock-kernel decompositions, no communication). The distributed runs must equal them."""

import torch

from hpcattn.kernels import attn_reference
from hpcattn.methods.apb import anchor_rows, pool_scores, select_passing
from hpcattn.methods.star import star_blocks


def simulate_star(q, k, v, p, block, anchor, scale):
    """Block rows' outputs of every rank, concatenated in context order: (B, n, Hq, d)."""
    outs = []
    for r in range(p):
        for s0, s1 in star_blocks(q.shape[1], block, p)[r]:
            if s0 == 0:
                o, _ = attn_reference(q[:, s0:s1], k[:, s0:s1], v[:, s0:s1], scale=scale, causal="square")
            else:   # [anchor | block], plain causal mask over the concatenation, block rows kept
                cat = lambda x: torch.cat([x[:, :anchor], x[:, s0:s1]], 1)  # noqa: E731
                o, _ = attn_reference(cat(q), cat(k), cat(v), scale=scale, causal="square")
                o = o[:, anchor:]
            outs.append(o)
    return torch.cat(outs, 1)


def simulate_star_query(qq, kq, vq, k, v, p, block, scale, quirk=False):
    """Phase 2 with an explicit mask over [all caches | query KV]: (out, lse) of the query rows."""
    n, ql = k.shape[1], qq.shape[1]
    keys_k, keys_v = torch.cat([k, kq], 1), torch.cat([v, vq], 1)
    mask = torch.zeros(ql, n + ql, dtype=torch.bool)
    blocks = star_blocks(n, block, p)
    for r in range(p):
        segs = blocks[r]
        if not segs:
            continue
        a, b = segs[0][0], segs[-1][1]
        L = b - a
        for i in range(ql):
            if r == p - 1:
                mask[i, a:b] = True
                mask[i, n: n + i + 1] = True
            else:
                upto = L - ql + i if quirk else L - 1
                mask[i, a: a + max(upto + 1, 0)] = True
    return attn_reference(qq, keys_k, keys_v, scale=scale, mask=mask[None, None])


def simulate_apb(q, k, v, qq, kq, vq, p, prm, scale, compressor):
    """Every rank's block-row outputs in context order: (B, n, Hq, d) (explicit-mask attention)."""
    n = q.shape[1]
    lb = n // p
    locs, sends = [], []
    for r in range(p):
        blk = slice(r * lb, (r + 1) * lb)
        la = prm.la if r > 0 else 0
        if la:
            loc = [torch.cat([anchor_rows(x, xq, prm), x[:, blk]], 1) for x, xq in ((q, qq), (k, kq), (v, vq))]
        else:
            loc = [q[:, blk], k[:, blk], v[:, blk]]
        locs.append((la, *loc))
        if prm.lp and p > 1:
            score = pool_scores(compressor(*loc, r), prm.pool)
            sends.append(select_passing(score, loc[1], loc[2], prm.lp, prm.la)[0])
    d = k.shape[-1]
    outs = []
    for r, (la, ql_, kl, vl) in enumerate(locs):
        if r == 0 or not sends:
            P_k = kl[:, :0]
            P_v = vl[:, :0]
        else:
            P_k = torch.cat([sends[i][..., :d] for i in range(r)], 1)
            P_v = torch.cat([sends[i][..., d:] for i in range(r)], 1)
        if r == 0:
            o, _ = attn_reference(ql_, kl, vl, scale=scale, causal="square")
            outs.append(o)
            continue
        P = P_k.shape[1]
        K, V = torch.cat([P_k, kl], 1), torch.cat([P_v, vl], 1)
        S = ql_.shape[1]
        mask = torch.zeros(S, P + S, dtype=torch.bool)
        for i in range(S):
            if i < la:                                     # anchor row: anchor keys, causal
                mask[i, P: P + i + 1] = True
            else:                                          # block row: passing, anchor, block causal
                mask[i, : P + la] = True
                mask[i, P + la: P + i + 1] = True
        o, _ = attn_reference(ql_, K, V, scale=scale, mask=mask[None, None])
        outs.append(o[:, la:])
    return torch.cat(outs, 1)

"""Flash-attention's tolerance rule for tests: the baseline is plain attention computed in the
input dtype; an implementation passes when err <= 2 * err_baseline + 1e-5 against float64, both
finite (``within``: the jobs' own rule; a NaN/Inf never passes, also not against a NaN baseline)."""

import torch

from hpcattn.jobs.check import max_err, within  # noqa: F401  (max |a - b|: inf on NaN; the rule)
from hpcattn.kernels.reference import causal_offset


def same_dtype_attention(q, k, v, *, scale, causal="none", lengths=None):
    """Plain attention with every op in q.dtype.

    q (B,Sq,Hq,d), k/v (B,Sk,Hkv,d); ``lengths`` (per-sequence valid keys) makes a ragged batch,
    and bottom-right causal is then aligned to each sequence's length. Returns out (B,Sq,Hq,d) and
    lse (B,Hq,Sq) in q.dtype; rows without keys give out = 0, lse = -inf.
    """
    dt = q.dtype
    B, Sq, Hq, d = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    g = Hq // Hkv
    k, v = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    dev = q.device
    kpos = torch.arange(Sk, device=dev).view(1, 1, 1, Sk)
    n = torch.tensor(lengths if lengths is not None else [Sk] * B, device=dev).view(B, 1, 1, 1)
    keep = kpos < n
    if causal_offset(causal, Sq, Sk) is not None:
        qpos = torch.arange(Sq, device=dev).view(1, 1, Sq, 1)
        keep = keep & (kpos <= qpos + (n - Sq if causal == "bottom_right" else 0))
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    return torch.einsum("bhqk,bkhd->bqhd", p.to(dt), v).to(dt), lse

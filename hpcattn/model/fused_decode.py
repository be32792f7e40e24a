"""The decode step's forward with its small ops fused, for the captured decode step.

Inside a CUDA graph a decode step costs about one kernel per op, and the plain model
(:mod:`hpcattn.model.llama`) issues ~47 per layer: RMSNorm alone is 8 elementwise kernels, RoPE 8
per tensor. Most of them touch a few KB, so each costs its launch slot (~2 us on an H200), not
bandwidth; at 32 layers that is ~3 ms against a ~4.5 ms byte floor. This forward computes the same
function of the same parameters in 7-11 kernels per layer (7 at B = 1 on CUDA):

    [rmsnorm] + wqkv (1 or 2) - rope_and_cache (1: rotates q and k, stores k and v in the
    cache slot) - attention (the caller's; Lean: 2) - wo + residual (1) - [rmsnorm] + w13
    (1 or 2) - [silu_mul] + w2 + residual (1 or 2)

Each product runs on cuBLAS (F.linear / addmm, the residual folded in) or as one
:func:`hpcattn.model.gemv.gemv` kernel with its neighbours fused (``products``, config ``run.decode_products``): ``auto`` takes
gemv on CUDA where it was measured faster (:func:`hpcattn.model.gemv.tuned`: every product at B = 1,
5 kernels per layer besides attention; o + residual alone at larger batches), ``gemv`` takes it for
every product it supports (up to :data:`hpcattn.model.gemv.MAX_ROWS` rows; tests), ``torch`` for none.

The q/k/v weights of a layer, and its gate/up weights, are read by one product each: on first use
:func:`fuse_projections` stores them in one buffer per layer and turns the layer's ``wq``/``wk``/
``wv`` (``w1``/``w3``) weights into views of it, so no memory is added and the plain model reads the
very same numbers (three small GEMVs at B = 1 cost their launch and tail each).

Rounding follows the plain model (RMSNorm in float32 then the model dtype times the weight; RoPE in
the cos/sin dtype; SiLU in float32 rounded before the product); the residual adds are fused into the
GEMMs (one rounding instead of two), so low-precision results can differ from the plain model's in
the last bit. Shapes: token (B,), hidden (B, dim), q (B, 1, Hq, d) as everywhere in hpcattn.
The kernels run on CUDA and under Triton's CPU interpreter (tests).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from hpcattn.model import gemv as _gemv

PRODUCT_MODES = ("auto", "gemv", "torch")    # decode_forward's ``products`` (config run.decode_products)


@triton.jit
def _rmsnorm(X, W, Y, N, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = offs < N
    x = tl.load(X + row * N + offs, mask=m, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(x * x, 0) / N + eps)
    y = (x * r).to(Y.dtype.element_ty)                         # .to(x.dtype), as the plain model
    w = tl.load(W + offs, mask=m, other=0.0)
    tl.store(Y + row * N + offs, (y.to(tl.float32) * w.to(tl.float32)).to(Y.dtype.element_ty), mask=m)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (B, dim) contiguous -> RMSNorm(x) * weight in x.dtype (one kernel)."""
    B, N = x.shape
    y = torch.empty_like(x)
    _rmsnorm[(B,)](x, weight, y, N, eps, BLOCK=triton.next_power_of_2(N), num_warps=8 if N >= 2048 else 4)
    return y


@triton.jit
def _rotate(P, dd, m, HALF: tl.constexpr, cos, sin):
    """Rotate-half RoPE of one head row at P (HF convention), in the cos/sin dtype."""
    rot = tl.where(dd < HALF, dd + HALF, dd - HALF)
    x = tl.load(P + dd, mask=m, other=0.0).to(cos.dtype)
    xr = tl.load(P + rot, mask=m, other=0.0).to(cos.dtype)
    return x * cos + tl.where(dd < HALF, -xr, xr) * sin


@triton.jit
def _rope_cache(Q, K, V, COS, SIN, QO, KB, VB, AT, sqb, sqh, skb, skh, svb, svh, sob, soh,
                scb, sch, scs, srb, Hq, D: tl.constexpr, HALF: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (b, j): j < Hq rotates q head j into QO; j >= Hq rotates k head j-Hq and stores it
    and v's head into cache slot AT[0] of KB / VB (B, Hkv, cap, d). Row b's cos/sin start at
    COS + b * srb (srb = 0: one position for every row)."""
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    dd = tl.arange(0, BLOCK_D)
    m = dd < D
    cos = tl.load(COS + b * srb + dd, mask=m, other=0.0)
    sin = tl.load(SIN + b * srb + dd, mask=m, other=0.0)
    if j < Hq:
        y = _rotate(Q + b * sqb + j * sqh, dd, m, HALF, cos, sin)
        tl.store(QO + b * sob + j * soh + dd, y.to(QO.dtype.element_ty), mask=m)
    else:
        h = (j - Hq).to(tl.int64)
        at = tl.load(AT)
        y = _rotate(K + b * skb + h * skh, dd, m, HALF, cos, sin)
        tl.store(KB + b * scb + h * sch + at * scs + dd, y.to(KB.dtype.element_ty), mask=m)
        vv = tl.load(V + b * svb + h * svh + dd, mask=m, other=0.0)
        tl.store(VB + b * scb + h * sch + at * scs + dd, vv, mask=m)


def rope_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   slot: tuple[torch.Tensor, torch.Tensor] | None, at: torch.Tensor,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, Hq, d), k, v (B, Hkv, d) (last dim contiguous); cos, sin (d,) (one position for every
    row) or (B, d) contiguous (a position per row: Lamina's ragged prompts); slot = (k_buf, v_buf)
    (B, Hkv, cap, d) with unit last stride, or None (this rank stores nothing); at (1,) int64.
    Returns rotated q (B, 1, Hq, d), in ``out`` when given (unit last stride); stores rotated k and v
    at token slot ``at`` of the buffers."""
    B, Hq, d = q.shape
    Hkv = k.shape[1]
    qo = torch.empty(B, 1, Hq, d, dtype=q.dtype, device=q.device) if out is None else out
    kb, vb = slot if slot is not None else (k.view(B, Hkv, 1, d), v.view(B, Hkv, 1, d))
    assert kb.stride() == vb.stride() and kb.stride(-1) == 1 and q.stride(-1) == k.stride(-1) == 1
    assert qo.shape == (B, 1, Hq, d) and qo.stride(-1) == 1 and cos.is_contiguous() and sin.is_contiguous()
    srb = 0 if cos.dim() == 1 else d
    _rope_cache[(B, Hq + (Hkv if slot is not None else 0))](
        q, k, v, cos, sin, qo, kb, vb, at, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), qo.stride(0), qo.stride(2), kb.stride(0), kb.stride(1), kb.stride(2),
        srb, Hq, D=d, HALF=d // 2, BLOCK_D=triton.next_power_of_2(d), num_warps=1)
    return qo


@triton.jit
def _silu_mul(AB, Y, F_, BLOCK: tl.constexpr):
    """Program (row, block): Y[row, i] = silu(AB[row, i]) * AB[row, F_ + i]."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < F_
    a = tl.load(AB + row * 2 * F_ + offs, mask=m, other=0.0).to(tl.float32)
    s = (a / (1.0 + tl.exp(-a))).to(Y.dtype.element_ty)      # F.silu rounds to the dtype first
    b = tl.load(AB + row * 2 * F_ + F_ + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(Y + row * F_ + offs, (s.to(tl.float32) * b).to(Y.dtype.element_ty), mask=m)


def silu_mul(ab: torch.Tensor) -> torch.Tensor:
    """ab (B, 2F) contiguous = [gate | up] -> F.silu(gate) * up (B, F) (one kernel)."""
    B, F2 = ab.shape
    y = torch.empty(B, F2 // 2, dtype=ab.dtype, device=ab.device)
    _silu_mul[(B, triton.cdiv(F2 // 2, 1024))](ab, y, F2 // 2, BLOCK=1024, num_warps=4)
    return y


def _fuse(linears: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One (sum of out_features, in) weight buffer (and bias) for ``linears``; each linear's
    weight (bias) becomes a view of its rows, so the module computes what it did before."""
    w = torch.cat([lin.weight.detach() for lin in linears])
    b = torch.cat([lin.bias.detach() for lin in linears]) if linears[0].bias is not None else None
    at = 0
    for lin in linears:
        n = lin.out_features
        lin.weight = torch.nn.Parameter(w[at:at + n], requires_grad=lin.weight.requires_grad)
        if b is not None:
            lin.bias = torch.nn.Parameter(b[at:at + n], requires_grad=lin.bias.requires_grad)
        at += n
    return w, b


def _still_fused(linears, w) -> bool:
    """Are the linears' weights still the row views of ``w`` that :func:`_fuse` made?"""
    at = 0
    for lin in linears:
        if lin.weight.data_ptr() != w.data_ptr() + at * w.stride(0) * w.element_size():
            return False
        at += lin.out_features
    return True


def fuse_projections(model) -> list[dict]:
    """Per layer {"qkv": (weight (Hq*d + 2*Hkv*d, dim), bias or None), "w13": (weight
    (2*ffn, dim), bias or None)}, built once (one layer's extra memory at a time) and kept on the
    model; rebuilt if a weight was replaced since (e.g. a checkpoint loaded afterwards)."""
    cached = getattr(model, "_hpcattn_fused", None)
    if cached is not None and all(
            _still_fused([L.attention.wq, L.attention.wk, L.attention.wv], f["qkv"][0])
            and _still_fused([L.feed_forward.w1, L.feed_forward.w3], f["w13"][0])
            for L, f in zip(model.layers, cached)):
        return cached
    fused = []
    with torch.no_grad():
        for layer in model.layers:
            att, ffn = layer.attention, layer.feed_forward
            fused.append({"qkv": _fuse([att.wq, att.wk, att.wv]), "w13": _fuse([ffn.w1, ffn.w3])})
    model._hpcattn_fused = fused
    return fused


def residual_linear(x: torch.Tensor, h: torch.Tensor, linear: torch.nn.Linear) -> torch.Tensor:
    """``x + linear(h)`` as one addmm (the residual add folded in); ``linear``'s bias too where it has
    one (Llama attention_bias on o_proj, mlp_bias on down_proj). x (B, out), h (B, in)."""
    return torch.addmm(x if linear.bias is None else x + linear.bias, h, linear.weight.t())


def decode_forward(model, token: torch.Tensor, pos: torch.Tensor, *,
                   slot: Callable[[int], tuple[torch.Tensor, torch.Tensor] | None], at: torch.Tensor,
                   attend: Callable[[int, torch.Tensor], torch.Tensor], products: str = "auto") -> torch.Tensor:
    """One decode step of ``model`` (:class:`hpcattn.model.llama.Transformer`).

    Args:
        token: (B,) int64 on the model's device; pos: (1,) int64, its RoPE position.
        slot: layer -> (k_buf, v_buf) (B, Hkv, cap, d) to store this token's k, v in, or None.
        at: (1,) int64 device tensor, the token slot to store at.
        attend: (layer, q (B, 1, Hq, d) post-RoPE) -> attention output (B, 1, Hq, d).
        products: ``auto`` | ``gemv`` | ``torch``: which products run on :func:`hpcattn.model.gemv.gemv`
            (module docstring).
    Returns:
        float32 logits (B, vocab).
    """
    a = model.args
    x = F.embedding(token, model.tok_embeddings.weight)                        # (B, dim)
    cos, sin = model.rope(pos, torch.float64 if x.dtype == torch.float64 else torch.float32)
    cos, sin = cos.view(-1), sin.view(-1)
    prods = step_products(model, x, products)
    for i in range(a.n_layers):
        q = pre_attention(model, i, x, cos, sin, slot(i), at, prods)
        x = post_attention(model, i, x, attend(i, q), prods)
    return head(model, x, prods)


def step_products(model, x: torch.Tensor, products: str = "auto") -> dict:
    """The launch parameters of every product of a decode step of the token rows x (B, dim)
    (:func:`_product`): keys qkv, w13, o, down, head; one dict serves every layer. Key ``fused``:
    the layers' fused weights (:func:`fuse_projections`)."""
    a = model.args
    nq, nkv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    return {"fused": fuse_projections(model), "qkv": _product("rmsnorm", x, nq + 2 * nkv, products),
            "w13": _product("rmsnorm", x, 2 * a.ffn_dim, products), "o": _product("residual", x, a.dim, products),
            "down": _product("silu_mul", x, a.dim, products),
            "head": _product("rmsnorm", x, a.vocab_size, products)}


def pre_attention(model, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  slot: tuple[torch.Tensor, torch.Tensor] | None, at: torch.Tensor, prods: dict,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Layer i before its attention: RMSNorm + the q/k/v product (one), RoPE of q and k, k and v
    stored at slot ``at`` of ``slot`` (:func:`rope_and_cache`). x (B, dim); cos, sin (d,) or (B, d);
    prods from :func:`step_products`. Returns the rotated q (B, 1, Hq, d) (in ``out`` if given)."""
    a = model.args
    B = x.shape[0]
    nq, nkv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    f = prods["fused"][i]
    qkv = _normed_product(x, model.layers[i].attention_norm, *f["qkv"], prods["qkv"])   # (B, nq + 2 nkv)
    q = qkv[:, :nq].view(B, a.n_heads, a.head_dim)
    k = qkv[:, nq:nq + nkv].view(B, a.n_kv_heads, a.head_dim)
    v = qkv[:, nq + nkv:].view(B, a.n_kv_heads, a.head_dim)
    return rope_and_cache(q, k, v, cos, sin, slot, at, out=out)


def post_attention(model, i: int, x: torch.Tensor, o: torch.Tensor, prods: dict) -> torch.Tensor:
    """Layer i after its attention: x + wo(o) (one product), then x + w2(silu(w1 h) * w3 h) with
    h = RMSNorm(x) (two products). x (B, dim), o (B, 1, Hq, d) or (B, Hq*d) -> x (B, dim)."""
    layer, f = model.layers[i], prods["fused"][i]
    x = _residual_product(x, o.reshape(x.shape[0], -1), layer.attention.wo, prods["o"])
    ab = _normed_product(x, layer.ffn_norm, *f["w13"], prods["w13"])                   # (B, 2 ffn) = [gate | up]
    return _residual_product(x, ab, layer.feed_forward.w2, prods["down"], silu=True)


def head(model, x: torch.Tensor, prods: dict) -> torch.Tensor:
    """Final RMSNorm and the vocabulary product: x (B, dim) -> float32 logits (B, vocab)."""
    return _normed_product(x, model.norm, model.output.weight, model.output.bias, prods["head"], torch.float32)


def _normed_product(x: torch.Tensor, norm, weight: torch.Tensor, bias: torch.Tensor | None, cfg: dict | None,
                    out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """F.linear(RMSNorm(x), weight, bias) as ``out_dtype`` (default x's): one gemv with the RMSNorm
    prologue (``cfg`` its launch parameters), or with cfg None the rmsnorm kernel and cuBLAS."""
    if cfg is not None:
        return _gemv.gemv(x, weight, bias, prologue="rmsnorm", norm_weight=norm.weight, eps=norm.eps,
                          out_dtype=out_dtype, cfg=cfg)
    y = F.linear(rmsnorm(x, norm.weight, norm.eps), weight, bias)
    return y if out_dtype is None else y.to(out_dtype)


def _residual_product(x: torch.Tensor, h: torch.Tensor, linear: torch.nn.Linear, cfg: dict | None,
                      silu: bool = False) -> torch.Tensor:
    """x + linear(h), or with ``silu`` x + linear(silu_mul(h)) (h = [gate | up]): one gemv (``cfg``
    its launch parameters), or with cfg None :func:`residual_linear` (one addmm) after silu_mul."""
    if cfg is not None:
        return _gemv.gemv(h.contiguous(), linear.weight, linear.bias, residual=x,
                          prologue="silu_mul" if silu else "none", cfg=cfg)
    return residual_linear(x, silu_mul(h) if silu else h, linear)


def _product(kind: str, x: torch.Tensor, N: int, products: str) -> dict | None:
    """gemv launch parameters for a ``kind`` product of the token rows x into N outputs, or None: cuBLAS (see
    ``products``; ``gemv`` gives {} = gemv's own default parameters where none were tuned)."""
    if products not in PRODUCT_MODES:
        raise ValueError(f"decode products {products!r}: expected one of {', '.join(PRODUCT_MODES)}")
    if products == "torch" or not _gemv.supported(x):
        return None
    cfg = _gemv.tuned(kind, x.shape[0], x.dtype, N)
    if products == "gemv":
        return cfg or {}
    return cfg if x.is_cuda else None
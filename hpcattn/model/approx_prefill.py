"""Star Attention and APB prefill inside the model runner (spec star_attention.md, apb.md).

The prompt of N tokens is split into a context (the first N - ql tokens) and a query (the last
``ql`` tokens). Context prefill:

* ``star``: each rank runs its blocks through all layers, every block but the first prefixed with
  the anchor (the context's first ``anchor`` tokens at positions 0..anchor-1); plain causal
  attention inside [anchor | block], no communication; the anchor's KV is dropped.
* ``apb``: rank r runs [anchor | block] (r > 0; the anchor is ctx[:s] ++ query ++ ctx[s:la-ql] at
  positions 0..la-1) through all layers; in every layer each rank scores its rows (pre-RoPE q/k/v),
  selects the top-lp post-RoPE K/V per KV head, all-gathers them, and attends with APB's mask
  (stock calls, exact). For the query-aware score, rank 1 broadcasts the query rows' pre-RoPE Q of
  its anchor, per layer, so rank 0's passing block is query-aware too.

Then the query pass (Star phase 2, shared by both): every rank runs the query tokens at positions
N-ql..N-1; each attends to its own cache (the last rank also to the query's KV, causally, and keeps
it), and the states are merged exactly. Decoding continues with the runner's decode method.
With the runner's ``prompt_logits`` every rank keeps the hidden states of its blocks (anchor
dropped) and the query host those of the query (:meth:`ModelRunner.gather_prompt_logits`).
"""

from __future__ import annotations

import torch

from hpcattn.methods.apb import APBParams, anchor_rows, apb_layer, exchanges, make_compressor
from hpcattn.methods.star import geometry, star_blocks, star_query


def star_context(run, ctx_tok: torch.Tensor, room: int) -> tuple[int, list[int]]:
    """Star phase 1 of ``ctx_tok`` (B, n) on this rank; returns the query host (last rank with
    blocks) and every rank's cached tokens."""
    B, n = ctx_tok.shape
    dev = ctx_tok.device
    opt = run.options.approx
    block, anchor = geometry(n, run.p, opt.star_block, opt.star_anchor)
    every = star_blocks(n, block, run.p)
    mine = every[run.r]
    kept = sum(b - a for a, b in mine)
    cache = run.new_cache(B, kept + room)
    at = 0
    for s0, s1 in mine:
        a = 0 if s0 == 0 else anchor
        ids = ctx_tok[:, s0:s1] if a == 0 else torch.cat([ctx_tok[:, :a], ctx_tok[:, s0:s1]], 1)
        pos = torch.arange(s0, s1, device=dev) if a == 0 else torch.cat(
            [torch.arange(a, device=dev), torch.arange(s0, s1, device=dev)])

        def attend(layer, q, k, v, _a=a, _at=at, **_):
            cache.write(layer, k[:, _a:], v[:, _a:], _at)
            return run.kernel(q, k, v, scale=run.scale, causal="square")[0]

        hidden = run.model(ids, pos, attend)
        run.keep_hidden(torch.arange(s0, s1), hidden[:, a:])
        at += s1 - s0
    cache.length = kept
    return max(i for i in range(run.p) if every[i]), [sum(b - a for a, b in blocks) for blocks in every]


def apb_context(run, ctx_tok: torch.Tensor, q_tok: torch.Tensor, room: int) -> tuple[int, list[int]]:
    """APB prefill of ``ctx_tok`` (B, n) with the query ``q_tok`` (B, ql) in the anchors; returns
    the query host (the last rank) and every rank's cached tokens."""
    B, n = ctx_tok.shape
    ql = q_tok.shape[1]
    dev = ctx_tok.device
    opt = run.options.approx
    prm: APBParams = opt.apb
    p, r = run.p, run.r
    lb = n // p
    la = prm.la if r > 0 else 0
    blk = ctx_tok[:, r * lb:(r + 1) * lb]
    pos = torch.arange(r * lb, (r + 1) * lb, device=dev)
    if la:
        ids, pos = torch.cat([anchor_rows(ctx_tok, q_tok, prm), blk], 1), torch.cat([torch.arange(la, device=dev), pos])
    else:
        ids = blk
    cache = run.new_cache(B, lb + room)
    a = run.model.args
    qrow = slice(prm.query_offset, prm.query_offset + ql)

    def attend(layer, q, k, v, pre, **_):
        qp, kp, vp = pre
        cache.write(layer, k[:, la:], v[:, la:], 0)
        tm = run.phase_timer
        qq = None
        if exchanges(prm, p) and opt.compressor == "query_aware":
            qq = qp[:, qrow].contiguous() if r == 1 else \
                torch.empty(B, ql, a.n_heads, a.head_dim, dtype=qp.dtype, device=dev)
            with tm("comm"):
                run.ctx.world.broadcast(qq, root=1)                 # rank 1's anchor holds the query
        # the attention is already timed as the model's "attention" part: the same label nests seamlessly
        # the compressor scores this rank's rows from their pre-RoPE q/k/v: (B, la + lb, Hkv)
        comp = make_compressor(opt.compressor, seed=opt.apb_seed, query=qq, layer=layer)
        out_b, _, _ = apb_layer(q, k, v, la, lambda: comp(qp, kp, vp, r), run.ctx, prm,
                                kernel=run.kernel, scale=run.scale, tm=tm, select_as="scoring",
                                attend_as="attention")
        if la == 0:
            return out_b
        out_a, _ = run.kernel(q[:, :la], k[:, :la], v[:, :la], scale=run.scale, causal="square")
        return torch.cat([out_a, out_b], 1)

    hidden = run.model(ids, pos, attend)
    run.keep_hidden(torch.arange(r * lb, (r + 1) * lb), hidden[:, la:])
    cache.length = lb
    return p - 1, [lb] * p


def query_pass(run, q_tok: torch.Tensor, start: int, host: int) -> torch.Tensor:
    """Star phase 2 for the query tokens (B, ql) at positions start..start+ql-1; the query host
    keeps their KV. Returns float32 logits (B, vocab) of the last query token (every rank)."""
    ql = q_tok.shape[1]
    dev = q_tok.device
    is_host = run.r == host
    cache = run.cache
    n0 = cache.length

    def attend(layer, q, k, v, **_):
        kc, vc = cache.view(layer, n0)
        out, _ = star_query(q, k, v, kc, vc, run.ctx, kernel=run.kernel, scale=run.scale, is_last=is_host,
                            reduction=run.options.reduction, quirk=run.options.approx.star_quirk)
        if is_host:
            cache.write(layer, k, v, n0)
        return out

    hidden = run.model(q_tok, torch.arange(start, start + ql, device=dev), attend)
    if is_host:
        cache.length = n0 + ql
        run.keep_hidden(torch.arange(start, start + ql), hidden)
    return run.model.logits(hidden[:, -1:])[:, 0]


def approx_prefill(run, tokens: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Star or APB prefill of the prompt (B, N) followed by the query pass; sets the runner's cache
    and returns the logits (B, vocab) of the last prompt token on every rank."""
    B, N = tokens.shape
    ql = run.options.approx.query_len
    ctx_tok, q_tok = tokens[:, : N - ql], tokens[:, N - ql:]
    room = ql + new_tokens
    if run.options.prefill == "star":
        host, lengths = star_context(run, ctx_tok, room)
    else:
        host, lengths = apb_context(run, ctx_tok, q_tok, room)
    lengths[host] += ql                # the query host keeps the query's KV (every rank knows every length)
    run.set_prompt(N, lengths)
    return query_pass(run, q_tok, N - ql, host)

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

from hpcattn.methods.apb import (APBParams, apb_attention, passing_from, pool_scores, score_query_aware,
                                 score_random, select_passing)
from hpcattn.methods.star import star_blocks, star_query
from hpcattn.model.kv_cache import ShardedKVCache


def _cache(run, B: int, tokens: int):
    a = run.model.args
    return ShardedKVCache(a.n_layers, B, a.n_kv_heads, a.head_dim, tokens,
                          run.model.tok_embeddings.weight.dtype, run.model.tok_embeddings.weight.device)


def star_context(run, ctx_tok: torch.Tensor, room: int) -> int:
    """Star phase 1 of ``ctx_tok`` (B, n) on this rank; returns the query host (last rank with blocks)."""
    B, n = ctx_tok.shape
    dev = ctx_tok.device
    block = run.star_block or n // run.p
    anchor = run.star_anchor if run.star_anchor is not None else block
    every = star_blocks(n, block, run.p)
    mine = every[run.r]
    kept = sum(b - a for a, b in mine)
    run.cache = _cache(run, B, kept + room)
    at = 0
    for s0, s1 in mine:
        a = 0 if s0 == 0 else anchor
        ids = ctx_tok[:, s0:s1] if a == 0 else torch.cat([ctx_tok[:, :a], ctx_tok[:, s0:s1]], 1)
        pos = torch.arange(s0, s1, device=dev) if a == 0 else torch.cat(
            [torch.arange(a, device=dev), torch.arange(s0, s1, device=dev)])

        def attend(layer, q, k, v, _a=a, _at=at, **_):
            run.cache.write(layer, k[:, _a:], v[:, _a:], _at)
            return run.kernel(q, k, v, scale=run.scale, causal="square")[0]

        hidden = run.model(ids, pos, attend)
        if run.prompt_logits:
            run.prompt_hidden.append((torch.arange(s0, s1), hidden[:, a:]))
        at += s1 - s0
    run.cache.length = kept
    run.lengths = [sum(b - a for a, b in blocks) for blocks in every]
    return max(i for i in range(run.p) if every[i])


def apb_context(run, ctx_tok: torch.Tensor, q_tok: torch.Tensor, room: int) -> int:
    """APB prefill of ``ctx_tok`` (B, n) with the query ``q_tok`` (B, ql) in the anchors; returns
    the query host (the last rank)."""
    B, n = ctx_tok.shape
    ql = q_tok.shape[1]
    dev = ctx_tok.device
    prm: APBParams = run.apb
    p, r = run.p, run.r
    lb = n // p
    la = prm.la if r > 0 else 0
    blk = ctx_tok[:, r * lb:(r + 1) * lb]
    pos = torch.arange(r * lb, (r + 1) * lb, device=dev)
    if la:
        if prm.query_in_anchor:
            s = prm.query_offset
            anchor = torch.cat([ctx_tok[:, :s], q_tok, ctx_tok[:, s: prm.la - ql]], 1)
        else:
            anchor = ctx_tok[:, :la]
        ids, pos = torch.cat([anchor, blk], 1), torch.cat([torch.arange(la, device=dev), pos])
    else:
        ids = blk
    run.cache = _cache(run, B, lb + room)
    a = run.model.args
    qrow = slice(prm.query_offset, prm.query_offset + ql)

    def attend(layer, q, k, v, pre, **_):
        qp, kp, vp = pre
        run.cache.write(layer, k[:, la:], v[:, la:], 0)
        pk = pv = k[:, :0]
        if prm.lp and p > 1:
            tm = run.phase_timer
            if run.compressor == "query_aware":
                qq = qp[:, qrow].contiguous() if r == 1 else \
                    torch.empty(B, ql, a.n_heads, a.head_dim, dtype=qp.dtype, device=dev)
                with tm("comm"):
                    run.ctx.world.broadcast(qq, root=1)             # rank 1's anchor holds the query
            with tm("scoring"):
                if run.compressor == "query_aware":
                    score = score_query_aware(kp, qq)
                elif run.compressor == "random":
                    score = score_random(kp.shape[:3], run.apb_seed, r, dev, layer)
                else:
                    score = run.compressor.score(layer, qp, kp, vp)  # RetainingHeads
                send, _ = select_passing(pool_scores(score, prm.pool), k, v, prm.lp, prm.la)
            with tm("comm"):
                recv = run.ctx.world.allgather(send)                 # all-gather (p, B, lp, Hkv, 2d)
            pk, pv = passing_from(recv, r)
        if r == 0:
            return run.kernel(q, k, v, scale=run.scale, causal="square")[0]
        out_b, _ = apb_attention(q, k, v, pk, pv, la, kernel=run.kernel, scale=run.scale)
        if la == 0:
            return out_b
        out_a, _ = run.kernel(q[:, :la], k[:, :la], v[:, :la], scale=run.scale, causal="square")
        return torch.cat([out_a, out_b], 1)

    hidden = run.model(ids, pos, attend)
    if run.prompt_logits:
        run.prompt_hidden.append((torch.arange(r * lb, (r + 1) * lb), hidden[:, la:]))
    run.cache.length = lb
    run.lengths = [lb] * p
    return p - 1


def query_pass(run, q_tok: torch.Tensor, start: int, host: int) -> torch.Tensor:
    """Star phase 2 for the query tokens (B, ql) at positions start..start+ql-1; the query host
    keeps their KV. Returns float32 logits (B, vocab) of the last query token (every rank)."""
    ql = q_tok.shape[1]
    dev = q_tok.device
    is_host = run.r == host
    n0 = run.cache.length

    def attend(layer, q, k, v, **_):
        kc, vc = run.cache.view(layer, n0)
        out, _ = star_query(q, k, v, kc, vc, run.ctx, kernel=run.kernel, scale=run.scale, is_last=is_host,
                            reduction=run.reduction, quirk=run.star_quirk)
        if is_host:
            run.cache.write(layer, k, v, n0)
        return out

    hidden = run.model(q_tok, torch.arange(start, start + ql, device=dev), attend)
    if is_host:
        run.cache.length = n0 + ql
        if run.prompt_logits:
            run.prompt_hidden.append((torch.arange(start, start + ql), hidden))
    run.lengths[host] += ql            # every rank keeps the same table of all ranks' cache lengths
    return run.model.logits(hidden[:, -1:])[:, 0]


def approx_prefill(run, tokens: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Star or APB prefill of the prompt (B, N) followed by the query pass; sets the runner's cache
    and returns the logits (B, vocab) of the last prompt token on every rank."""
    B, N = tokens.shape
    ql = run.query_len
    ctx_tok, q_tok = tokens[:, : N - ql], tokens[:, N - ql:]
    room = ql + new_tokens
    if run.prefill_method == "star":
        host = star_context(run, ctx_tok, room)
    else:
        host = apb_context(run, ctx_tok, q_tok, room)
    run.n_prompt, run.step = N, 0
    return query_pass(run, q_tok, N - ql, host)

"""Method parameters derived from a concrete config: the jobs translate ``cfg`` into the plain
arguments the methods take (methods never see the config)."""

from __future__ import annotations

from hpcattn.config import MODEL_JOBS, Config
from hpcattn.methods.apb import APBParams, RetainingHeads, make_compressor, preset
from hpcattn.methods.star import geometry


def star_geometry(cfg: Config, world_size: int, context: int | None = None) -> tuple[int, int]:
    """(block, anchor) of Star: ``star.block`` (default ``context // world_size``) tokens per block,
    the first ``star.anchor`` of them (default the whole block) as every host's anchor. ``context``
    is the context length (default shape.context)."""
    n = context if context is not None else cfg.shape.context
    return geometry(n, world_size, cfg.star.block, cfg.star.anchor)


def apb_params(cfg: Config, world_size: int, context: int | None = None):
    """APBParams of a concrete config (presets filled in, ablation switches applied); ``context``
    is the context length (default shape.context; the generate job passes prompt - query)."""
    la, lp = preset(context if context is not None else cfg.shape.context, world_size)
    a = cfg.apb
    ql = cfg.generate.query_len if cfg.job in MODEL_JOBS else cfg.shape.query_len
    if a.query_in_anchor:                 # the default anchor holds the query (APB embeds it there)
        la = max(la, a.query_offset + ql)
    la = a.anchor_len if a.anchor_len is not None else la
    lp = a.passing_len if a.passing_len is not None else lp
    return APBParams(la=la if a.anchor else 0, lp=lp if a.passing else 0, query_offset=a.query_offset,
                     query_in_anchor=a.query_in_anchor, pool=a.score_pool)


def apb_compressor_kind(cfg: Config, heads_q: int, heads_kv: int, head_dim: int, layers: list[int]):
    """``apb.compressor`` as :func:`hpcattn.methods.apb.make_compressor` takes it: ``"query_aware"``
    or ``"random"``, or the :class:`RetainingHeads` read from ``apb.retaining_heads_path`` for
    ``layers`` (shapes checked against heads_q / heads_kv / head_dim)."""
    a = cfg.apb
    if a.compressor in ("query_aware", "random"):
        return a.compressor
    return RetainingHeads(a.retaining_heads_path, a.retaining_heads_regex, heads_q, heads_kv, head_dim, layers)


def attention_level_compressor(cfg: Config, query):
    """The attention-level APB compressor of ``cfg`` (one layer: ``apb.layer``'s retaining heads;
    the random scores of layer 0's draw) -> (compressor, kind). query: (B, ql, Hq, d) the query
    rows' Q (the query-aware score)."""
    s, a = cfg.shape, cfg.apb
    kind = apb_compressor_kind(cfg, s.heads_q, s.heads_kv, s.head_dim, [a.layer])
    layer = a.layer if isinstance(kind, RetainingHeads) else 0
    return make_compressor(kind, seed=a.seed, query=query, layer=layer), kind

"""The model runner's options as plain values (the model layer never sees the config: the jobs
translate ``cfg`` into these, e.g. :meth:`hpcattn.jobs.generate.GenerateJob.runner`).

* :class:`ApproxOptions` - Star / APB prefill inside the model (:mod:`hpcattn.model.approx_prefill`);
* :class:`RunnerOptions` - the prefill and decode methods, their layouts and merges, CUDA graphs,
  prompt logits; holds an :class:`ApproxOptions`.

:meth:`RunnerOptions.of` builds one from the flat keywords ``ModelRunner`` also accepts
(``ModelRunner(model, ctx, kernel, prefill="apb", apb=..., query_len=4)``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from hpcattn.methods.apb import APBParams, RetainingHeads


@dataclass(frozen=True)
class ApproxOptions:
    """Star / APB prefill in the model runner: the last ``query_len`` prompt tokens are the query.

    star_block, star_anchor: Star's block and anchor (None: :func:`hpcattn.methods.star.geometry`'s
    defaults); star_quirk: the public code's causal mask on remote caches in the query pass;
    apb: APB's lengths (:class:`hpcattn.methods.apb.APBParams`); compressor: ``query_aware`` |
    ``random`` | a :class:`hpcattn.methods.apb.RetainingHeads`; apb_seed: the random compressor's seed.
    """

    query_len: int = 1
    star_block: int | None = None
    star_anchor: int | None = None
    star_quirk: bool = False
    apb: APBParams | None = None
    compressor: str | RetainingHeads = "query_aware"
    apb_seed: int = 0


@dataclass(frozen=True)
class RunnerOptions:
    """How a :class:`hpcattn.model.runner.ModelRunner` prefills and decodes.

    prefill: ``local`` | ``ring`` | ``star`` | ``apb``;  decode: ``local`` | ``tree`` | ``ring``.
    layout: ring prefill layout (``zigzag`` | ``contiguous``).
    reduction, topology: tree decode merge (see :func:`hpcattn.methods.tree_decode`).
    placement: where generated tokens' KV goes: ``last`` rank or ``round_robin``.
    cuda_graphs: ``auto`` | ``true`` | ``false`` (:mod:`hpcattn.graph`).
    decode_products: the captured step's products (:func:`hpcattn.model.fused_decode.decode_forward`:
        ``auto`` | ``gemv`` | ``torch``; config ``run.decode_products``).
    prompt_logits: keep what :meth:`ModelRunner.gather_prompt_logits` needs.
    approx: the Star / APB prefill's options.
    """

    prefill: str = "ring"
    decode: str = "tree"
    layout: str = "zigzag"
    reduction: str = "allgather"
    topology: str = "flat"
    placement: str = "last"
    cuda_graphs: str = "false"
    decode_products: str = "auto"
    prompt_logits: bool = False
    approx: ApproxOptions = field(default_factory=ApproxOptions)

    @classmethod
    def of(cls, base: RunnerOptions | None = None, **kw) -> RunnerOptions:
        """``base`` (default: the defaults) with the flat keywords ``kw`` replaced: the fields of
        this class and of :class:`ApproxOptions` (an unknown keyword is a TypeError)."""
        base = base or cls()
        approx_keys = {f.name for f in dataclasses.fields(ApproxOptions)}
        approx = {k: kw.pop(k) for k in list(kw) if k in approx_keys}
        return dataclasses.replace(base, approx=dataclasses.replace(base.approx, **approx), **kw)

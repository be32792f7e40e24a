"""The record of a case: the attributes every case record opens with, and its writing.

Every job's case record (decode, prefill, generate with or without Lamina, eval) opens with the same
attributes in the same order (:func:`case_attrs`): the case (method, variant, job), its shape, the
kernel, the world size, warm-up and repeats, and where it sits in the sweep. A job's own
attributes and datasets are dict merges onto these; :func:`write_case` writes the result and
returns the report row. docs/hdf5.md lists every attribute.
"""

from __future__ import annotations


def case_attrs(case, job: str, shape: dict, kernel: str, world_size: int, warmup: int, repeats: int) -> dict:
    """The attributes every case record opens with: method, variant, job, then ``shape``'s keys in
    its order (batch, heads_q, heads_kv, head_dim, context, lengths, dtype, causal, and what else the
    job's shape has, :func:`model_shape` for the whole-model jobs), then kernel, world_size, warmup,
    repeats, sweep_point, group."""
    return {"method": case.method, "variant": case.variant, "job": job, **shape, "kernel": kernel,
            "world_size": world_size, "warmup": warmup, "repeats": repeats, "sweep_point": case.point,
            "group": case.group}


def model_shape(cfg, args, batch: int) -> dict:
    """The shape attributes of a whole-model case (generate, eval): heads from the model's
    ``args`` (:class:`hpcattn.model.llama.ModelArgs`), ``batch`` sequences of ``shape.context``
    tokens, causal; ``lengths`` None (a ragged Lamina case merges its own)."""
    return {"batch": batch, "heads_q": args.n_heads, "heads_kv": args.n_kv_heads, "head_dim": args.head_dim,
            "context": cfg.shape.context, "lengths": None, "dtype": cfg.shape.dtype, "causal": True}


def write_case(writer, case, attrs: dict, datasets: dict) -> dict:
    """Rank 0: write the case's ``attrs`` and ``datasets`` ({name: (array, attributes)}) to
    ``writer`` (none: nothing is written); returns the report row (``attrs`` and the case id)."""
    if writer is not None:
        writer.write_case(case.id, attrs, datasets)
    return attrs | {"id": case.id}

"""``generate.decode: lamina``: one Lamina case of the generate job (hooked from
:func:`hpcattn.jobs.cases.run_generate_cases`), its record, plan estimate and variant name, and
its config: the roles' devices, the prompt lengths and the rules of a Lamina case (run by
:func:`hpcattn.jobs.validate.validate`).

Per case, after ``run.warmup`` untimed generations, ``run.repeats`` timed ones record per rank the
prefill time (model ranks: prefill + posting the KV hand-over), every decode step's wall time, and
how much of it the rank spent computing (busy) or waiting for data (wait); rank 0 writes the usual
generate datasets plus ``lamina_busy_s`` / ``lamina_wait_s`` / ``lamina_piece_s`` (the device time of the
captured pieces within busy; NaN for eager ranks) / ``lamina_send_s`` (the time of the send calls
within busy) (repeats, steps, ranks) and
``lamina_bytes`` (ranks, phases), and attributes: roles, per-role utilisation (busy / step time),
decode bytes per token, decode throughput (B / median step time), and per role whether its pieces
between exchanges ran as CUDA graphs and why (:func:`graph_summary`; ``run.cuda_graphs``).
"""

from __future__ import annotations

import numpy as np
import torch

from hpcattn import comm as comm_mod
from hpcattn import graph
from hpcattn.config import resolve_device
from hpcattn.dtypes import DTYPES
from hpcattn.errors import ConfigError
from hpcattn.jobs.generate import GenerateJob, case_record, model_args, reference_bytes, weight_bytes
from hpcattn.jobs.measure import peak_memory, timed_repeats
from hpcattn.jobs.record import write_case
from hpcattn.model.lamina import BYTE_PHASES, DECODE_PHASES, MODEL, LaminaDecoder, Layout


def layout_of(cfg, world: int) -> Layout:
    s = cfg.shape
    return Layout(world, cfg.lamina.attention_ranks, s.heads_q, s.heads_kv, s.batch, cfg.lamina.microbatches)


def variant(cfg, p: int) -> str:
    """The case variant: ring layout (over the model ranks), attention ranks, micro-batches."""
    M = p - cfg.lamina.attention_ranks
    parts = [cfg.ring.layout] if cfg.generate.prefill == "ring" and M > 1 else []
    return "/".join(parts + [f"model{M}-attn{cfg.lamina.attention_ranks}", f"mb{cfg.lamina.microbatches}"])


# -- the config of a Lamina case: its roles' devices, prompt lengths and rules ---------------------

def role_devices(cfg, cuda_available: bool) -> tuple[str, str]:
    """(model device, attention device) of a config: lamina.*_device, auto = run.device resolved."""
    run = resolve_device(cfg, cuda_available)
    lm = cfg.lamina
    return (run if lm.model_device == "auto" else lm.model_device,
            run if lm.attention_device == "auto" else lm.attention_device)


def rank_device(cfg, rank: int, world: int, cuda_available: bool) -> str:
    """The device kind of world rank ``rank`` in a Lamina run."""
    model_dev, attn_dev = role_devices(cfg, cuda_available)
    return attn_dev if rank >= world - cfg.lamina.attention_ranks else model_dev


def prompt_lengths(cfg) -> list[int]:
    """Per-sequence prompt lengths: shape.lengths (ragged prompts) or shape.context for every row."""
    s = cfg.shape
    return list(s.lengths) if s.lengths is not None else [s.context] * s.batch


def validate_config(cfg, world_size: int, cuda_available: bool, source: str) -> None:
    """Checks of a ``generate.decode: lamina`` case (shape.heads_* already resolved from the model)."""
    lm, s, g = cfg.lamina, cfg.shape, cfg.generate
    A = lm.attention_ranks
    if A < 1:
        raise ConfigError(f"{source}: lamina.attention_ranks must be >= 1, got {A}")
    if world_size - A < 1:
        raise ConfigError(f"{source}: lamina.attention_ranks={A} leaves no model rank: generate.decode=lamina "
                          f"needs at least {A + 1} ranks, the run has {world_size}")
    if s.heads_kv % A:
        raise ConfigError(f"{source}: lamina.attention_ranks={A} must divide the model's KV heads "
                          f"(shape.heads_kv={s.heads_kv}): each attention rank owns Hkv/A heads of every sequence")
    if lm.microbatches < 1 or lm.microbatches > s.batch:
        raise ConfigError(f"{source}: lamina.microbatches={lm.microbatches} must be in [1, shape.batch={s.batch}]")
    if g.prefill not in ("local", "ring"):
        raise ConfigError(f"{source}: generate.decode=lamina hands over exact prompt KV: generate.prefill must be "
                          f"local or ring, got {g.prefill}")
    model_dev, attn_dev = role_devices(cfg, cuda_available)
    for key, dev in (("lamina.model_device", model_dev), ("lamina.attention_device", attn_dev)):
        if dev == "cuda" and not cuda_available:
            raise ConfigError(f"{source}: {key}=cuda but no CUDA GPU is visible")
        if dev == "cpu" and s.dtype == "float16":
            raise ConfigError(f"{source}: {key}=cpu: shape.dtype=float16 is not supported on CPU ranks")
        if dev == "cpu" and cfg.kernel.backend not in ("auto", "torch_ref", "cpu_flash"):
            raise ConfigError(f"{source}: {key}=cpu: kernel.backend={cfg.kernel.backend} needs a GPU "
                              f"(use auto or torch_ref)")
    if model_dev != attn_dev and cfg.comm.backend != "mpi":
        raise ConfigError(f"{source}: a mixed pool (model ranks on {model_dev}, attention ranks on {attn_dev}) "
                          f"needs comm.backend=mpi (nccl/gloo serve one device kind), got {cfg.comm.backend}")
    if cfg.run.cuda_graphs == "true":
        for key, dev in (("lamina.model_device", model_dev), ("lamina.attention_device", attn_dev)):
            graph.decide("true", graph.blocker(device=dev, method="lamina", backend=cfg.comm.backend,
                                               world_size=world_size),
                         where=f"{source}: run.cuda_graphs ({key}={dev})")
    if cfg.comm.backend == "nccl" and "cpu" in (model_dev, attn_dev):
        raise ConfigError(f"{source}: comm.backend=nccl needs every Lamina role on cuda")
    if cfg.comm.backend == "gloo" and "cuda" in (model_dev, attn_dev):
        raise ConfigError(f"{source}: comm.backend=gloo is the CPU stand-in for nccl; a cuda role needs nccl or mpi")
    lengths = prompt_lengths(cfg)
    if any(n < 1 for n in lengths):
        raise ConfigError(f"{source}: shape.lengths: every prompt needs at least one token, got {lengths}")
    M = world_size - A
    if g.prefill == "ring" and M > 1:
        for n in sorted(set(lengths)):
            if n < M or (cfg.ring.layout == "zigzag" and n % (2 * M)):
                raise ConfigError(f"{source}: ring prefill over the {M} model ranks: prompt length {n} must be "
                                  f">= {M}" + (f" and divisible by 2 x {M} = {2 * M} (ring.layout=zigzag; use "
                                               f"contiguous)" if cfg.ring.layout == "zigzag" else ""))


# -- plan, run and record ----------------------------------------------------------------------------

def estimate(cfg, p: int) -> tuple[int, int]:
    """(bytes on the busiest rank, payload bytes per decode step summed over ranks) for ``hpcattn
    run --dry-run`` and the memory check. A model rank holds the weights, its prefill KV shard and,
    until the hand-over's sends complete, a contiguous copy of that shard; an attention rank holds
    its head slice of the whole cache and the receive buffers of every layer's prompt KV, posted
    before the first decode step (:meth:`LaminaDecoder` hand-over)."""
    a = model_args(cfg)
    e = torch.empty(0, dtype=DTYPES[cfg.shape.dtype]).element_size()
    A = cfg.lamina.attention_ranks
    M = max(p - A, 1)
    B, L = cfg.shape.batch, a.n_layers
    prompt = max(prompt_lengths(cfg))
    n = prompt + cfg.generate.new_tokens
    per_token = 2 * L * B * a.head_dim * e                   # k and v of one token, every layer, one KV head
    shard = per_token * a.n_kv_heads * (prompt if cfg.generate.prefill == "local" or M == 1 else -(-prompt // M))
    model_rank = weight_bytes(a, e) + 2 * shard
    attention_rank = per_token * (a.n_kv_heads // max(A, 1)) * (n + prompt)
    step = B * L * e * a.head_dim * (2 * a.n_heads + 2 * a.n_kv_heads) + (B * L * a.dim * e if M > 1 else 0)
    return max(model_rank, attention_rank), step


def estimate_case(cfg, method: str, p: int) -> tuple[int, int, int]:
    """The generate job's plan estimate of a Lamina case (:func:`hpcattn.jobs.generate.estimate`'s
    triple): rank 0 is a model rank (weights, no KV), and runs the reference."""
    a = model_args(cfg)
    e = torch.empty(0, dtype=DTYPES[cfg.shape.dtype]).element_size()
    weights = weight_bytes(a, e)
    n = cfg.shape.context + cfg.generate.new_tokens
    busiest, step = estimate(cfg, p)
    ref = reference_bytes(cfg, a, n, 0)
    return max(busiest, weights + ref), step, ref


def run_lamina_case(case, ctx, kernel, writer, model=None):
    """Run one Lamina case on every rank (collective). Returns (row on rank 0 else None, the model
    of this rank: None on attention ranks, reused by the next case on model ranks)."""
    c = case.cfg
    lay = layout_of(c, ctx.size)
    role = lay.role(ctx.rank)
    lengths, n = prompt_lengths(c), c.generate.new_tokens
    colors = tuple(0 if lay.role(r) == MODEL else 1 for r in range(ctx.size))
    role_ctx = comm_mod.split(ctx, list(colors))     # made once per role layout and run
    job = tokens = None
    if role == MODEL:
        job = GenerateJob(c, ctx, kernel, model)
        model, tokens = job.model, job.tokens
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    dec = LaminaDecoder(lay, ctx, role_ctx, model_args(c), kernel, DTYPES[c.shape.dtype], model,
                        prefill=c.generate.prefill, ring_layout=c.ring.layout, cuda_graphs=c.run.cuda_graphs,
                        decode_products=c.run.decode_products)
    runs = timed_repeats(ctx, c.run.warmup, c.run.repeats,
                         lambda i: dec.generate(tokens, lengths, n, keep_logits=c.run.check or c.run.save_outputs))
    res = runs[-1]
    mine = {"prefill": np.asarray([r.prefill_s for r in runs]),
            "step": np.asarray([r.step_s for r in runs], dtype=np.float64).reshape(len(runs), n - 1),
            "busy": np.asarray([r.busy_s for r in runs], dtype=np.float64).reshape(len(runs), n - 1),
            "wait": np.asarray([r.wait_s for r in runs], dtype=np.float64).reshape(len(runs), n - 1),
            "piece": np.asarray([r.piece_s for r in runs], dtype=np.float64).reshape(len(runs), n - 1),
            "send": np.asarray([r.send_s for r in runs], dtype=np.float64).reshape(len(runs), n - 1),
            "bytes": [res.bytes[ph] for ph in BYTE_PHASES], "role": role, "kernel": kernel.name,
            "device": str(ctx.device), "mem": peak_memory(ctx.device), **dec.graph_attrs()}
    per_rank = ctx.world.mpi.gather(mine, root=0)
    if ctx.rank != 0:
        return None, model
    check = _check(job, case, res.tokens, res.logits, lengths) if c.run.check else {}
    attrs, datasets = case_record(case, kernel, ctx, job, res.tokens, res.logits, check,
                                  [(pr["prefill"], pr["step"], pr["mem"]) for pr in per_rank])
    extra_attrs, extra_sets = _lamina_summary(c, lay, per_rank, lengths)
    if extra_attrs["lengths"]:        # ragged prompts: the throughput counts each prompt's own tokens
        attrs["throughput_tok_s"] *= (sum(lengths) + len(lengths) * n) / (c.shape.batch * (c.shape.context + n))
    return write_case(writer, case, attrs | extra_attrs, datasets | extra_sets), model


def _check(job, case, toks: torch.Tensor, logits: torch.Tensor, lengths: list[int]) -> dict:
    """The generate job's check (:meth:`GenerateJob.check`) of the Lamina tokens (B, n) and logits
    (n, B, V); a ragged batch is checked one sequence at a time (its own prompt length) and the
    figures combined (max errors, summed token counts, mean agreement, all must pass)."""
    if len(set(lengths)) == 1:
        job.compute_reference(case)
        return job.check(toks, logits) or {}
    full, parts = job.tokens, []
    try:
        for b, n in enumerate(lengths):
            job.tokens = full[b:b + 1, :n]
            job.compute_reference(case)
            parts.append(job.check(toks[b:b + 1], logits[:, b:b + 1]))
    finally:
        job.tokens = full
    out = dict(parts[0])
    for k in ("logits_max_err", "logits_base_err", "logits_rel_err"):
        out[k] = max(p[k] for p in parts)
    for k in ("tokens_decided", "tokens_mismatched"):
        out[k] = sum(p[k] for p in parts)
    out["token_agreement"] = float(np.mean([p["token_agreement"] for p in parts]))
    verdicts = [p["check_passed"] for p in parts]
    out["check_passed"] = None if None in verdicts else all(verdicts)
    out["check_reason"] = "; ".join(f"sequence {b}: {p['check_reason']}" for b, p in enumerate(parts)
                                    if p.get("check_reason"))
    return out


def _lamina_summary(c, lay: Layout, per_rank: list[dict], lengths: list[int]) -> tuple[dict, dict]:
    """Attributes and datasets a Lamina case merges into the generate record (its ``lengths``
    replaces the generate record's None when the prompts are ragged)."""
    roles = [pr["role"] for pr in per_rank]
    busy = np.stack([pr["busy"] for pr in per_rank], axis=2)            # (R, steps, ranks)
    wait = np.stack([pr["wait"] for pr in per_rank], axis=2)
    piece = np.stack([pr["piece"] for pr in per_rank], axis=2)
    send = np.stack([pr["send"] for pr in per_rank], axis=2)
    step = np.stack([pr["step"] for pr in per_rank], axis=2)
    nbytes = np.asarray([pr["bytes"] for pr in per_rank], dtype=np.int64)   # (ranks, phases)
    B, steps = c.shape.batch, c.generate.new_tokens - 1
    step_max = step.max(axis=2) if steps else np.zeros((step.shape[0], 0))
    attrs = {**graph_summary(per_rank),
             "lamina_model_ranks": lay.model_ranks, "lamina_attention_ranks": lay.attention_ranks,
             "lamina_microbatches": lay.microbatches, "lamina_roles": roles,
             "lamina_devices": [pr["device"] for pr in per_rank],
             "lamina_attention_kernel": next((pr["kernel"] for pr in per_rank if pr["role"] != MODEL), ""),
             "lengths": lengths if len(set(lengths)) > 1 else None,
             "handover_bytes": int(nbytes[:, BYTE_PHASES.index("handover")].sum())}
    decode_cols = [BYTE_PHASES.index(ph) for ph in DECODE_PHASES]
    if steps:
        attrs["bytes_per_token"] = float(nbytes[:, decode_cols].sum() / (B * steps))
        attrs["bytes_per_step"] = int(nbytes[:, decode_cols].sum() // steps)
        attrs["decode_tok_s"] = float(B / np.median(step_max))
        for r in (MODEL, "attention"):
            cols = [i for i, x in enumerate(roles) if x == r]
            tot = step[:, :, cols].sum()
            attrs[f"lamina_{r}_util"] = float(busy[:, :, cols].sum() / tot) if tot > 0 else 0.0
            attrs[f"lamina_{r}_wait_frac"] = float(wait[:, :, cols].sum() / tot) if tot > 0 else 0.0
    sets = {"lamina_busy_s": (busy, {"units": "s", "layout": "(repeats, steps, ranks)", "roles": roles}),
            "lamina_wait_s": (wait, {"units": "s", "layout": "(repeats, steps, ranks)", "roles": roles}),
            "lamina_piece_s": (piece, {"units": "s", "layout": "(repeats, steps, ranks)", "roles": roles,
                                       "note": "device time of the replayed CUDA-graph pieces within busy "
                                               "(CUDA events); NaN on eager ranks"}),
            "lamina_send_s": (send, {"units": "s", "layout": "(repeats, steps, ranks)", "roles": roles,
                                     "note": "time of the decode step's send calls within busy (the transport's "
                                             "work there; over MPI on a GPU after a device sync)"}),
            "lamina_bytes": (nbytes, {"units": "bytes", "phases": list(BYTE_PHASES), "roles": roles,
                                      "note": "payload sent per generation, warm-up excluded"})}
    return attrs, sets


def graph_summary(per_rank: list[dict]) -> dict:
    """Record attributes of the ranks' CUDA-graph modes ({"role", "cuda_graphs", "cuda_graphs_reason"}
    per rank): per role ``lamina_<role>_cuda_graphs`` (``graph`` | ``eager``, or ``mixed`` when its
    ranks differ) and ``lamina_<role>_cuda_graphs_reason``; ``cuda_graphs`` for the case (``graph``
    when every rank captured, ``eager`` when none did, else ``mixed``) and ``cuda_graphs_reason``
    (each role's reason)."""
    attrs, reasons = {}, []
    for role in (MODEL, "attention"):
        mine = [pr for pr in per_rank if pr["role"] == role]
        modes = sorted({pr["cuda_graphs"] for pr in mine})
        why = "; ".join(sorted({pr["cuda_graphs_reason"] for pr in mine}))
        attrs[f"lamina_{role}_cuda_graphs"] = modes[0] if len(modes) == 1 else "mixed"
        attrs[f"lamina_{role}_cuda_graphs_reason"] = why
        reasons.append(f"{role} ranks: {why}")
    modes = {pr["cuda_graphs"] for pr in per_rank}
    attrs["cuda_graphs"] = modes.pop() if len(modes) == 1 else "mixed"
    same = attrs[f"lamina_{MODEL}_cuda_graphs_reason"] == attrs["lamina_attention_cuda_graphs_reason"]
    attrs["cuda_graphs_reason"] = attrs["lamina_attention_cuda_graphs_reason"] if same else "; ".join(reasons)
    return attrs

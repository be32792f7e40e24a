"""The generate job: prefill a prompt and greedily decode ``generate.new_tokens`` tokens with a
Llama-family model whose attention runs distributed across the ranks.

Per case (prefill method + decode method at one sweep point), after ``run.warmup`` untimed
generations, ``run.repeats`` timed ones record the prefill time and every decode step's time
(device-synchronised, per rank; reported as max over ranks), the tokens, peak memory, and the
throughput as the APB paper counts it: (input + generated tokens) / (prefill + decode wall time).
With ``run.check`` rank 0 also generates in one process (local prefill and decode, no
communication) and the record holds the greedy-token agreement and the max logit error.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np
import torch

from hpcattn import watchdog
from hpcattn.errors import ConfigError, InputError
from hpcattn.jobs.inputs import DTYPES


# -- prompts and shapes ----------------------------------------------------------------------------

def model_args(cfg):
    from hpcattn.model.llama import ModelArgs
    from hpcattn.model.weights import args_from_hf_config

    if cfg.model.path:
        a = args_from_hf_config(cfg.model.path)
    else:
        a = ModelArgs.from_preset(cfg.model.preset)
    if cfg.model.layers is not None:
        a.n_layers = cfg.model.layers
    return a


def _tokenizer(cfg):
    from tokenizers import Tokenizer  # optional package

    return Tokenizer.from_file(str(Path(cfg.model.path) / "tokenizer.json"))


def prompt_ids(cfg) -> torch.Tensor | None:
    """The prompt from generate.prompt_ids / prompt_text as (B, N) int64 (B = shape.batch rows
    unless the file holds a 2-D array), or None for a synthetic prompt."""
    g = cfg.generate
    if g.prompt_text is not None:
        try:
            ids = _tokenizer(cfg).encode(g.prompt_text).ids
        except ImportError:
            raise ConfigError("generate.prompt_text needs the 'tokenizers' package") from None
        arr = np.asarray(ids, dtype=np.int64)
    elif g.prompt_ids is not None:
        p = Path(g.prompt_ids)
        try:
            arr = np.load(p) if p.suffix == ".npy" else np.asarray(p.read_text().split(), dtype=np.int64)
        except (ValueError, OSError) as e:
            raise InputError(f"generate.prompt_ids: {p}: expected integers (.txt) or an .npy array: {e}") from None
    else:
        return None
    arr = np.asarray(arr, dtype=np.int64)
    if arr.ndim == 1:
        arr = np.broadcast_to(arr, (cfg.shape.batch, arr.shape[0]))
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise InputError(f"generate prompt: expected a non-empty 1-D or 2-D array of ids, got shape {arr.shape}")
    return torch.from_numpy(np.array(arr, dtype=np.int64, copy=True))


def resolve_shape(cfg) -> None:
    """Rank 0, before validation: shape.heads_*/head_dim from the model, context/batch from the prompt."""
    a = model_args(cfg)
    cfg.shape.heads_q, cfg.shape.heads_kv, cfg.shape.head_dim = a.n_heads, a.n_kv_heads, a.head_dim
    ids = prompt_ids(cfg)
    if ids is not None:
        if int(ids.max()) >= a.vocab_size or int(ids.min()) < 0:
            raise InputError(f"generate prompt: token ids must be in [0, {a.vocab_size}), "
                             f"got [{int(ids.min())}, {int(ids.max())}]")
        cfg.shape.batch, cfg.shape.context = int(ids.shape[0]), int(ids.shape[1])


def synthetic_prompt(cfg, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(cfg.inputs.seed)
    return torch.randint(0, vocab, (cfg.shape.batch, cfg.shape.context), generator=g)


# -- the job -----------------------------------------------------------------------------------------

class GenerateJob:
    """Model, prompt and reference of one sweep point on this rank."""

    def __init__(self, cfg, ctx, kernel, model=None):
        from hpcattn.model.weights import build_model

        self.cfg, self.ctx, self.kernel = cfg, ctx, kernel
        self.dtype = DTYPES[cfg.shape.dtype]
        self.model = model if model is not None else build_model(cfg, self.dtype, ctx.device)
        ids = prompt_ids(cfg)
        self.tokens = (ids if ids is not None else synthetic_prompt(cfg, self.model.args.vocab_size)).to(ctx.device)
        self.reference = None

    def runner(self, case, ctx=None, prefill=None, decode=None):
        from hpcattn.model.runner import ModelRunner

        from hpcattn.config import apb_params

        c = case.cfg
        p = ctx.size if ctx is not None else 1
        return ModelRunner(self.model, ctx, self.kernel, prefill=prefill or c.generate.prefill,
                           decode=decode or c.generate.decode, layout=c.ring.layout,
                           reduction=c.tree.reduction, topology=c.tree.topology,
                           placement=c.generate.kv_placement, query_len=c.generate.query_len,
                           star_block=c.star.block, star_anchor=c.star.anchor,
                           star_quirk=c.star.compat_remote_causal_quirk,
                           apb=apb_params(c, p, c.shape.context - c.generate.query_len),
                           compressor=self.compressor(c), apb_seed=c.apb.seed)

    def compressor(self, c):
        if c.apb.compressor != "retaining_heads" or c.generate.prefill != "apb":
            return c.apb.compressor
        if getattr(self, "_heads", None) is None:
            from hpcattn.methods.apb import RetainingHeads

            a = self.model.args
            self._heads = RetainingHeads(c.apb.retaining_heads_path, c.apb.retaining_heads_regex, a.n_heads,
                                         a.n_kv_heads, a.head_dim, list(range(a.n_layers)))
        return self._heads

    def compute_reference(self, case) -> None:
        """Rank 0: one-process generation (local prefill and decode) to check against."""
        if self.ctx.rank != 0 or not self.cfg.run.check:
            return
        toks, logits = self.runner(case, None, "local", "local").generate(self.tokens, self.cfg.generate.new_tokens)
        self.reference = (toks.cpu(), logits.cpu())

    def run(self, case):
        """Warm-up + timed repeats. Returns (tokens, logits, prefill_s (R,), decode_s (R, steps))."""
        c = case.cfg
        n = c.generate.new_tokens
        spans: dict[str, list[float]] = {"prefill": [], "decode": []}

        @contextlib.contextmanager
        def timer(name):
            self.ctx.sync()
            t0 = time.perf_counter()
            yield
            self.ctx.sync()
            spans[name].append(time.perf_counter() - t0)

        prefill_s, decode_s = [], []
        toks = logits = None
        for i in range(c.run.warmup + c.run.repeats):
            for v in spans.values():
                v.clear()
            self.ctx.barrier()
            toks, logits = self.runner(case, self.ctx).generate(self.tokens, n, timer)
            if i >= c.run.warmup:
                prefill_s.append(spans["prefill"][0])
                decode_s.append(list(spans["decode"]))
        return toks, logits, np.asarray(prefill_s), np.asarray(decode_s, dtype=np.float64).reshape(c.run.repeats, n - 1)

    def check(self, toks, logits) -> dict | None:
        """Rank 0: agreement with the one-process reference (None without a check). Exact methods
        pass when tokens are identical and logits agree (float32/64); star/apb are approximate:
        their agreement and logit error are fidelity figures, not a pass/fail check."""
        if self.reference is None:
            return None
        rt, rl = self.reference
        agree = float((toks.cpu() == rt).double().mean())
        err = float((logits.cpu() - rl).abs().max())
        rel = err / max(float(rl.abs().max()), 1e-30)
        tol = {"float64": 1e-9, "float32": 1e-4}.get(self.cfg.shape.dtype)
        exact = self.cfg.generate.prefill not in ("star", "apb")
        passed = (agree == 1.0 and rel <= tol) if tol is not None and exact else None
        return {"token_agreement": agree, "logits_max_err": err, "logits_rel_err": rel, "check_passed": passed}


def run_generate_cases(cfg, cases, ctx, kernel_for, writer, progress, model=None) -> list[dict]:
    """Execute generate cases (collective); rank 0 writes each finished case."""
    rows = []
    for case in cases:
        watchdog.arm(f"case {case.id}")
        kernel = kernel_for(case.cfg)
        job = GenerateJob(case.cfg, ctx, kernel, model)
        model = job.model                      # same weights for every case of the run
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        job.compute_reference(case)
        toks, logits, prefill_s, decode_s = job.run(case)
        from hpcattn.jobs.runner import _peak_memory

        per_rank = ctx.world.mpi.gather((prefill_s, decode_s, _peak_memory(ctx.device)), root=0)
        if ctx.rank == 0:
            row = _record(case, kernel, ctx, job, toks, job.check(toks, logits) or {}, per_rank, writer)
            rows.append(row)
            progress(case, row)
        del job
    return rows


def _record(case, kernel, ctx, job, toks, check: dict, per_rank, writer) -> dict:
    c = case.cfg
    a = job.model.args
    pre = np.stack([pr[0] for pr in per_rank], axis=1)                   # (R, ranks)
    dec = np.stack([pr[1] for pr in per_rank], axis=2)                   # (R, steps, ranks)
    mem = np.asarray([pr[2] for pr in per_rank], dtype=np.int64)
    pre_max, dec_max = pre.max(axis=1), dec.max(axis=2)                  # max over ranks
    total = pre_max + dec_max.sum(axis=1)
    B, N, n = c.shape.batch, c.shape.context, c.generate.new_tokens
    attrs = {"method": case.method, "variant": case.variant, "job": "generate", "batch": B,
             "heads_q": a.n_heads, "heads_kv": a.n_kv_heads, "head_dim": a.head_dim, "context": N,
             "lengths": None, "dtype": c.shape.dtype, "causal": True, "kernel": kernel.name,
             "world_size": ctx.size, "warmup": c.run.warmup, "repeats": c.run.repeats,
             "sweep_point": case.point, "group": case.group, "model": c.model.path or c.model.preset,
             "n_layers": a.n_layers, "new_tokens": n, "kv_placement": c.generate.kv_placement,
             "time_median_s": float(np.median(total)), "time_p10_s": float(np.percentile(total, 10)),
             "time_p90_s": float(np.percentile(total, 90)), "time_min_s": float(total.min()),
             "prefill_median_s": float(np.median(pre_max)),
             "decode_step_median_s": float(np.median(dec_max)) if dec_max.size else 0.0,
             "throughput_tok_s": float(B * (N + n) / np.median(total)), "comm_fraction": 0.0,
             "peak_mem_bytes": int(mem.max())}
    attrs |= check
    tok_np = toks.cpu().numpy()
    try:
        attrs["text"] = _tokenizer(c).decode(tok_np[0].tolist()) if c.model.path and \
            (Path(c.model.path) / "tokenizer.json").is_file() else ""
    except ImportError:
        attrs["text"] = ""
    datasets = {"time_s": (total[:, None].repeat(ctx.size, axis=1), {"units": "s", "note": "whole generation"}),
                "prefill_s": (pre, {"units": "s"}), "decode_step_s": (dec, {"units": "s"}),
                "tokens": (tok_np, {"layout": "(B, new_tokens)"}), "peak_mem_bytes": (mem, {"units": "bytes"})}
    if writer is not None:
        writer.write_case(case.id, attrs, datasets)
    return attrs | {"id": case.id}


def estimate(cfg, method: str, p: int) -> tuple[int, int]:
    """(bytes of weights + KV cache on the busiest rank, payload bytes per rank per decode step)."""
    a = model_args(cfg)
    e = torch.empty(0, dtype=DTYPES[cfg.shape.dtype]).element_size()
    weights = e * (2 * a.vocab_size * a.dim + a.n_layers * (
        a.dim * a.head_dim * (a.n_heads * 2 + a.n_kv_heads * 2) + 3 * a.dim * a.ffn_dim + 2 * a.dim))
    prefill, decode = method.split("+")
    n = cfg.shape.context + cfg.generate.new_tokens
    per_rank = n if (prefill == "local" and decode == "local") or p == 1 else -(-n // p) + cfg.generate.new_tokens
    kv = 2 * a.n_layers * cfg.shape.batch * per_rank * a.n_kv_heads * a.head_dim * e
    state = cfg.shape.batch * a.n_heads * (a.head_dim + 1) * 4
    # per decode step: tree sends one state per layer; ring moves every other rank's KV shard
    step = {"tree": a.n_layers * state, "ring": (p - 1) * kv, "local": 0}[decode] if p > 1 else 0
    return weights + kv, step

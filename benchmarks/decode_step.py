"""Decode at the memory floor, in one run on one GPU (issue 14):

    python benchmarks/decode_step.py --json runs/decode_step.json          # everything
    python benchmarks/decode_step.py --sections lean attn --quick

Sections (each prints a table; --json gets every row, rewritten after every section):
  ceiling  device-to-device copy of 4 GiB (bytes read + written) and a streaming sum: the
           bandwidths every floor below divides by (the copy rate; the sum rate is shown too)
  lean     Lean (device-side schedule, CUDA graph) vs cuDNN (aten op, native GQA, CUDA graph) per
           shape: B=1 4K..1M and B=8 ragged; a small sweep of Lean's grid / tile / reduction, the
           best per shape reported; L2 flushed before every timed call (--flush write: 512 MiB
           written, the default; read: 512 MiB summed, L2 left clean)
  leanprof CUPTI kernel durations of one call (eager, L2 flushed): cuDNN vs Lean's main and
           merge kernels, stream-K vs aligned split, two-kernel vs fused reduction, and the main
           pass's registers / spills / shared memory (not in the default set)
  gemv     the decode step's products, Llama-3.1-8B shapes (q/k/v, o, gate/up, down, lm_head), B=1
           and 8: cuBLAS with the small ops the torch path runs around it (RMSNorm, SiLU*up,
           residual add) vs hpcattn.model.gemv (one kernel, the small ops fused), each call in a
           graph of several calls over distinct weights (L2 holds none); a sweep of gemv's tile
           configurations on the plain product, the best per shape reported
  attn     the attention-level decode step as the decode job runs it (Kernel wrapper of the
           run's kernel: cuDNN, and Lean), eager host launches vs one graph replay, vs its floor
  model    end-to-end decode step of the Llama-3.1-8B shape (random weights, bf16), 4 and 32
           layers, 8K/32K/128K context, B=1 and 8 (32 layers at B=8, 128K needs 137 GB of KV:
           skipped): eager (kernel auto: dense decode on aten_flash), eager with the Lean kernel,
           graph (the runner's captured fused step, Lean with device lengths, decode_products auto)
           and g-cuBLAS (the same graph with decode_products torch), vs the byte
           floor (weights read once + KV read once) / copy rate; greedy tokens of eager and graph
           compared
  hf       Hugging Face transformers' LlamaForCausalLM with the same shape (its own random weights:
           timing does not depend on them), StaticCache, sdpa attention: the decode step at every
           shape of the model section, eager and under torch.compile(mode="reduce-overhead",
           fullgraph=True) (HF's fastest decode; --hf-compile-shapes limits which, compiles are slow)

Timing: CUDA events, warm-up, median; eager steps synchronise after each step (the GPU timeline
between the events includes every launch gap); graph steps are replays.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton  # noqa: E402

RESULTS: dict = {"rows": []}


def emit(section: str, **row):
    RESULTS["rows"].append({"section": section, **row})


def save(path):
    if path:
        with open(path, "w") as f:
            json.dump(RESULTS, f, indent=1)


# ------------------------------------------------------------------------------------------------
# timing


FLUSH_MODE = "write"


@triton.jit
def _empty(X):
    """Does nothing: a graph of it times the fixed cost of one replay."""
    pass


class Flush:
    """Evict L2 before a timed call: ``write`` fills a 512 MiB buffer (L2 left full of dirty lines:
    the timed kernel also pays their write-back), ``read`` sums it (L2 left clean, as after the
    weight reads that precede attention in a decode step). ``--flush`` picks."""

    def __init__(self, mb: int, mode: str | None = None):
        self.mode = mode or FLUSH_MODE
        self.buf = torch.empty(mb * 2 ** 20 // 4, dtype=torch.float32, device="cuda") if mb else None
        if self.buf is not None:
            self.buf.fill_(1.0)

    def __call__(self):
        if self.buf is None:
            return
        if self.mode == "write":
            self.buf.fill_(1.0)
        else:
            self.buf.sum()


def time_fn(fn, reps=30, warmup=3, flush=None, sync_each=False) -> float:
    """Median ms of fn() over reps (events around each call; optional L2 flush before each)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        if flush is not None:
            flush()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        if sync_each:
            b.synchronize()
        ts.append((a, b))
    torch.cuda.synchronize()
    ms = sorted(x.elapsed_time(y) for x, y in ts)
    return ms[len(ms) // 2]


def graphed(fn):
    from hpcattn.graph import StepGraph
    return StepGraph(fn)


# ------------------------------------------------------------------------------------------------
# sections


def ceiling(args) -> float:
    n = 4 * 2 ** 30
    src = torch.empty(n // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src), reps=20)
    copy = 2 * n / ms / 1e9
    ms_sum = time_fn(lambda: src.sum(dtype=torch.float32), reps=20)
    rd = n / ms_sum / 1e9
    del src, dst
    torch.cuda.empty_cache()
    x = torch.zeros(1, device="cuda")
    replay = time_fn(graphed(lambda: _empty[(132,)](x)), flush=Flush(512))
    print(f"\n## ceiling: copy {copy:.2f} TB/s (read+write), streaming sum {rd:.2f} TB/s; "
          f"a graph of one empty kernel times {replay * 1e3:.1f} us (the fixed cost in every graph row)")
    emit("ceiling", copy_tb_s=copy, sum_tb_s=rd, empty_graph_ms=replay, flush=FLUSH_MODE)
    return copy


def _kv(B, N, Hkv=8, d=128, dtype=torch.bfloat16):
    from hpcattn.kernels import head_major
    k = torch.empty(B, Hkv, N, d, dtype=dtype, device="cuda").normal_().transpose(1, 2)
    v = torch.empty(B, Hkv, N, d, dtype=dtype, device="cuda").normal_().transpose(1, 2)
    assert k.transpose(1, 2).is_contiguous()
    return k, v, head_major


def _cudnn(q, k, v, scale):
    r = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True, 0.0, False, False, scale=scale)
    return r[0], r[1]


LEAN_SWEEP = [  # (programs per SM, block_n, reduction, num_warps, num_stages, TMA loads, split, PDL merge);
    # None = the default. The configurations that were best somewhere in a 13-entry sweep, a 24-entry
    # probe (one H200, 2026-12-02: 0.5-4 programs/SM, 32-256 keys, 4/8 warps, 2-4 stages, both
    # reductions) and 17-entry sweeps of deeper pipelines, TMA loads and the aligned split (2026-12-03)
    None, (1, 64, "two_kernel", 4, 3, False, "stream_k", False), (2, 64, "two_kernel", 4, 4, False, "stream_k", False),
    (1, 64, "two_kernel", 4, 4, False, "aligned", True), (2, 32, "two_kernel", 4, 4, False, "aligned", False),
    (2, 64, "two_kernel", 4, 4, False, "aligned", False), (1, 64, "fused", 4, 4, False, "aligned", False),
]
LEAN_SWEEP_WIDE = LEAN_SWEEP + [  # --lean-sweep wide
    (1, 64, "two_kernel", 4, 3, False, "aligned", False), (1, 64, "two_kernel", 4, 5, False, "aligned", False),
    (1, 64, "two_kernel", 4, 5, False, "aligned", True), (2, 32, "two_kernel", 4, 4, False, "aligned", True),
    (1, 128, "two_kernel", 4, 3, True, "aligned", True), (1, 64, "two_kernel", 4, 4, True, "aligned", False),
    (1, 32, "two_kernel", 4, 6, False, "aligned", False), (1, 64, "two_kernel", 8, 4, False, "aligned", False),
    (2, 64, "two_kernel", 4, 4, False, "stream_k", True), (1, 64, "two_kernel", 4, 3, False, "stream_k", True),
]


def _ctx(n: int) -> str:
    """4K for 4096, 5000 for 5000."""
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _cfg_name(c):
    """1x64tw4s3 = 1 program/SM, 64-key tiles, two-kernel (f: fused), 4 warps, 3 stages; T: TMA
    loads; A: segment-aligned split (else stream-K); P: merge launched as a programmatic dependent."""
    if c is None:
        return "default"
    return (f"{c[0]}x{c[1]}{'f' if c[2] == 'fused' else 't'}w{c[3]}s{c[4]}" + ("T" if c[5] else "")
            + ("A" if c[6] == "aligned" else "") + ("P" if c[7] else ""))


def _lean_kw(c, sms):
    """lean_decode keyword arguments of a sweep entry (None: the defaults)."""
    if c is None:
        return {}
    return dict(num_programs=c[0] * sms, block_n=c[1], reduction=c[2], num_warps=c[3], num_stages=c[4],
                tma=c[5], split=c[6], pdl=c[7])


def kernel_stats(jit, before=()):
    """Registers, spills and shared memory of the compiled variants of a Triton kernel that are not
    in ``before`` (keys of an earlier call): what a configuration costs the compiler."""
    out = {}
    for caches in getattr(jit, "device_caches", {}).values():
        for key, kern in caches[0].items():
            if key in before:
                continue
            kern = kern.result() if hasattr(kern, "result") else kern
            try:
                kern._init_handles()
            except Exception:
                pass
            out[key] = dict(regs=getattr(kern, "n_regs", None), spills=getattr(kern, "n_spills", None),
                            smem=getattr(kern.metadata, "shared", None))
    return out


def lean_vs_cudnn(args, bw):
    from hpcattn.kernels.lean import lean_decode
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    flush = Flush(512)
    scale = 128 ** -0.5
    print("\n## lean vs cuDNN (graph replays, L2 flushed; ms; floor = KV bytes / copy rate)")
    print(f"{'shape':22} {'floor':>7} {'cudnn':>7} {'lean':>7} {'vs cudnn':>9} {'best':>7} {'vs cudnn':>8}  "
          f"{'best config':14}  all configs (programs/SM x block_n, t/f = two-kernel/fused, warps, stages, T = TMA loads, A = aligned split, P = PDL merge)")
    shapes = [(f"B1 N{_ctx(n)}", [n]) for n in args.ctx_b1]
    rnd = random.Random(0)
    shapes.append(("B8 ragged 1K-128K", [int(2 ** rnd.uniform(10, 17)) for _ in range(8)]))
    for name, lengths in shapes:
        B, cap = len(lengths), max(lengths)
        q = torch.randn(B, 1, 32, 128, dtype=torch.bfloat16, device="cuda")
        k, v, _ = _kv(B, cap)
        kv_bytes = sum(lengths) * 8 * 128 * 2 * 2
        floor = kv_bytes / bw / 1e9
        ragged = len(set(lengths)) > 1
        if ragged:   # cuDNN has no length argument: one call per sequence over its own keys
            fns = [(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n]) for b, n in enumerate(lengths)]
            ref_fn = lambda: [_cudnn(a, b_, c, scale) for a, b_, c in fns]   # noqa: E731
        else:
            ref_fn = lambda: _cudnn(q, k, v, scale)                           # noqa: E731
        t_cudnn = time_fn(graphed(ref_fn), flush=flush)
        lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
        res = {}
        sweep = LEAN_SWEEP_WIDE if args.lean_sweep == "wide" else LEAN_SWEEP
        for c in (sweep if not args.quick else sweep[:3]):
            kw = _lean_kw(c, sms)
            try:
                fn = lambda: lean_decode(q, k, v, scale=scale, k_lengths=lens, **kw)  # noqa: E731
                res[c] = time_fn(graphed(fn), flush=flush)
            except Exception as e:   # a config that does not compile here is skipped
                print(f"   lean {_cfg_name(c)}: {type(e).__name__}: {str(e)[:120]}")
        best = min(res, key=res.get)
        o, l = lean_decode(q, k, v, scale=scale, k_lengths=lens)
        if not ragged:
            ro, rl = _cudnn(q, k, v, scale)
            err = (o.float() - ro.transpose(1, 2).float()).abs().max().item()
        else:
            err = float("nan")
        allc = " ".join(f"{_cfg_name(c)}={t:.4f}" for c, t in res.items())
        print(f"{name:22} {floor:7.4f} {t_cudnn:7.4f} {res[None]:7.4f} {t_cudnn / res[None]:9.2f}x "
              f"{res[best]:7.4f} {t_cudnn / res[best]:8.2f}x  {_cfg_name(best):14}  {allc}")
        emit("lean", shape=name, lengths=lengths, floor_ms=floor, cudnn_ms=t_cudnn, lean_default_ms=res[None],
             lean_best_ms=res[best], lean_best=_cfg_name(best), lean_all={_cfg_name(c): t for c, t in res.items()},
             lean_vs_cudnn=t_cudnn / res[None], best_lean_vs_cudnn=t_cudnn / res[best], max_err_vs_cudnn=err)
        del q, k, v
        torch.cuda.empty_cache()
        save(args.json)


def lean_profile(args, bw):
    """Where the time of one decode attention call goes: CUPTI kernel durations (torch.profiler,
    eager launches, L2 flushed before each call) of cuDNN and of Lean's main and merge kernels."""
    from torch.profiler import ProfilerActivity, profile
    from hpcattn.kernels import lean
    from hpcattn.kernels.lean import lean_decode
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    flush = Flush(512)
    scale = 128 ** -0.5
    configs = [None, (1, 64, "two_kernel", 4, 3, False, "stream_k", False),
               (2, 64, "two_kernel", 4, 4, False, "stream_k", False), (1, 64, "two_kernel", 4, 4, False, "aligned", True),
               (1, 64, "fused", 4, 4, False, "aligned", False)]
    print("\n## kernel durations per call (us; CUPTI, eager, L2 flushed; sum = all kernels of the call; with the\n"
          "## PDL merge (default, 'P' rows) the merge's record starts at its early launch and includes its wait)")
    for n in args.ctx_b1:
        q = torch.randn(1, 1, 32, 128, dtype=torch.bfloat16, device="cuda")
        k, v, _ = _kv(1, n)
        lens = torch.tensor([n], dtype=torch.int32, device="cuda")
        cases = [("cudnn", lambda: _cudnn(q, k, v, scale))]
        for c in configs:
            kw = _lean_kw(c, sms)
            cases.append((f"lean {_cfg_name(c)}", lambda kw=kw: lean_decode(q, k, v, scale=scale, k_lengths=lens, **kw)))
        cases.append(("lean default uniform", lambda: lean_decode(q, k, v, scale=scale)))
        for name, fn in cases:
            seen = set(kernel_stats(lean._lean_fwd))
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            stats = list(kernel_stats(lean._lean_fwd, seen).values())
            reps = 20
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(reps):
                    flush()
                    fn()
                torch.cuda.synchronize()
            per = {}
            for e in prof.events():
                if e.device_type.name == "CUDA" and "reduce" not in e.name and "fill" not in e.name \
                        and "elementwise" not in e.name.lower() and "memcpy" not in e.name.lower():
                    per.setdefault(e.name, []).append(e.time_range.end - e.time_range.start)
            parts = {k_[:40]: sorted(t)[len(t) // 2] for k_, t in per.items()}
            tot = sum(parts.values())
            print(f"N {_ctx(n):>6}  {name:26} sum {tot:7.1f}  " + "  ".join(f"{k_}={t:.1f}" for k_, t in parts.items())
                  + "".join(f"  [main pass compiled: {st['regs']} regs, {st['spills']} spills, {st['smem']} B smem]"
                            for st in stats), flush=True)
            emit("leanprof", n=n, case=name, sum_us=tot, kernels=parts, compiled=stats)
        del q, k, v
        torch.cuda.empty_cache()


GEMV_SHAPES = {"qkv": (6144, 4096, "rmsnorm"), "o": (4096, 4096, "residual"), "gate_up": (28672, 4096, "rmsnorm"),
               "down": (4096, 14336, "silu_mul"), "lm_head": (128256, 4096, "rmsnorm")}
GEMV_SWEEP = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns)
              for bn in (16, 32, 64) for bk in (256, 512, 1024) for nw in (4, 8) for ns in (3,)]


def gemv_products(args, bw):
    """The decode step's products: cuBLAS plus the torch path's small ops vs the fused gemv."""
    import torch.nn.functional as F

    from hpcattn.model import gemv as G
    from hpcattn.model.fused_decode import residual_linear, rmsnorm, silu_mul

    print("\n## decode products, Llama-3.1-8B shapes, bf16 (us per call, a graph of R calls over distinct "
          "weights / R; TB/s = weight bytes / time)")
    print("   gemv: default configuration; tuned: gemv.TUNED's, where the decode step uses gemv (- : it keeps cuBLAS)")
    print(f"{'product':>8} {'B':>2} {'N':>6} {'K':>6} {'R':>3} {'floor':>7} {'cuBLAS+ops':>10} {'gemv':>8} "
          f"{'tuned':>7} {'gemv best':>9} {'best/cuBLAS':>11} {'TB/s':>6}  best config")
    sweep = GEMV_SWEEP[:4] if args.quick else GEMV_SWEEP[:args.gemv_sweep]
    for name, (N, K, op) in GEMV_SHAPES.items():
        R = max(2, min(32, int(2e9 // (N * K * 2))))
        ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5 for _ in range(R)]
        lins = []
        for w in ws:
            lin = torch.nn.Linear(K, N, bias=False, device="meta")
            lin.weight = torch.nn.Parameter(w, requires_grad=False)
            lins.append(lin)
        nw = torch.rand(K, device="cuda", dtype=torch.bfloat16) + 0.5
        for B in args.batch:
            xin = torch.randn(B, 2 * K if op == "silu_mul" else K, device="cuda", dtype=torch.bfloat16)
            res = torch.randn(B, N, device="cuda", dtype=torch.bfloat16)

            def torch_path():
                for lin in lins:
                    if op == "rmsnorm":
                        F.linear(rmsnorm(xin, nw, 1e-5), lin.weight)
                    elif op == "residual":
                        residual_linear(res, xin, lin)
                    else:
                        residual_linear(res, silu_mul(xin), lin)

            def fused(cfg=None):
                def run():
                    for w in ws:
                        if op == "rmsnorm":
                            G.gemv(xin, w, prologue="rmsnorm", norm_weight=nw, eps=1e-5, cfg=cfg)
                        elif op == "residual":
                            G.gemv(xin, w, residual=res, cfg=cfg)
                        else:
                            G.gemv(xin, w, residual=res, prologue="silu_mul", cfg=cfg)
                return run

            flush = Flush(512)
            t_torch = time_fn(graphed(torch_path), flush=flush) / R
            t_gemv = time_fn(graphed(fused()), flush=flush) / R
            cfg_t = G.tuned(op, B, torch.bfloat16, N)
            t_tuned = time_fn(graphed(fused(cfg_t)), flush=flush) / R if cfg_t else None
            best = (t_gemv, "default")
            for cfg in sweep:
                try:
                    t = time_fn(graphed(fused(cfg)), reps=10, flush=flush) / R
                except Exception as e:                   # out of shared memory / registers
                    print(f"   {cfg}: {type(e).__name__}")
                    continue
                if t < best[0]:
                    best = (t, cfg)
            floor = N * K * 2 / bw / 1e9
            tt = f"{t_tuned * 1e3:7.2f}" if t_tuned else f"{'-':>7}"
            print(f"{name:>8} {B:2} {N:6} {K:6} {R:3} {floor * 1e3:7.2f} {t_torch * 1e3:10.2f} {t_gemv * 1e3:8.2f} "
                  f"{tt} {best[0] * 1e3:9.2f} {t_torch / best[0]:10.2f}x {N * K * 2 / best[0] / 1e9:6.2f}  {best[1]}")
            emit("gemv", product=name, batch=B, N=N, K=K, calls=R, floor_ms=floor, torch_ms=t_torch,
                 gemv_ms=t_gemv, gemv_tuned_ms=t_tuned, tuned_config=cfg_t, gemv_best_ms=best[0],
                 best_config=best[1])
            save(args.json)
        del ws, lins
        torch.cuda.empty_cache()


def attn_step(args, bw):
    """The decode job's step: Kernel wrapper (what local_attention / tree_decode p=1 call)."""
    from hpcattn.kernels import select_kernel
    from hpcattn.methods import local_attention, tree_decode
    flush = Flush(512)
    scale = 128 ** -0.5
    print("\n## attention-level decode step (decode job path, B=1, Hq 32, Hkv 8, d 128, bf16; ms)")
    print(f"{'N':>8} {'floor':>7} {'kernel':>10} {'method':>6} {'eager':>8} {'graph':>8} {'eager/floor':>11} "
          f"{'graph/floor':>11}")
    kerns = [select_kernel(n, "cuda", torch.bfloat16, 128) for n in ("aten_cudnn", "auto", "lean")]
    for n in args.ctx_attn:
        q = torch.randn(1, 1, 32, 128, dtype=torch.bfloat16, device="cuda")
        k, v, _ = _kv(1, n)
        floor = n * 8 * 128 * 4 / bw / 1e9
        for kern in kerns:
            for method in ("local", "tree"):
                if method == "local":
                    fn = lambda: local_attention(q, k, v, kernel=kern, scale=scale)  # noqa: E731
                else:
                    fn = lambda: tree_decode(q, k, v, CTX, kernel=kern, scale=scale)  # noqa: E731
                te = time_fn(fn, flush=flush, sync_each=True)
                tg = time_fn(graphed(fn), flush=flush)
                name = kern.name if not kern.auto else "auto:" + kern.selftest.get("decode", kern.name).split()[0]
                print(f"{n:8} {floor:7.4f} {name:>10} {method:>6} {te:8.4f} {tg:8.4f} {te / floor:10.2f}x "
                      f"{tg / floor:10.2f}x")
                emit("attn", context=n, kernel=name, method=method, floor_ms=floor, eager_ms=te, graph_ms=tg)
        del q, k, v
        torch.cuda.empty_cache()
        save(args.json)


class _OneRank:
    """A one-rank CommContext stand-in for tree_decode (p = 1: no collective)."""

    class world:
        size = 1


CTX = _OneRank()


def _model(n_layers):
    from hpcattn.model.llama import ModelArgs
    from hpcattn.model.weights import random_model_on_device
    a = ModelArgs.from_preset("llama-3.1-8b")
    a.n_layers = n_layers
    return random_model_on_device(a, torch.bfloat16, "cuda")


def model_step(args, bw):
    from hpcattn.kernels import select_kernel
    from hpcattn.model.runner import ModelRunner
    print("\n## end-to-end decode step, Llama-3.1-8B shape, random bf16 weights (ms; floor = (weights + KV) / copy rate)")
    print("   eager: the runner with kernel auto (dense decode on aten_flash);"
          " eager-lean: same with the Lean kernel; graph: captured fused step (Lean, device lengths,"
          " gemv products); g-cuBLAS: the same graph with cuBLAS products and separate small ops")
    print(f"{'layers':>6} {'B':>2} {'N':>7} {'GB read':>8} {'floor':>7} {'eager':>8} {'e-lean':>8} {'g-cuBLAS':>8} {'graph':>8} "
          f"{'eager/floor':>11} {'e-lean/fl':>10} {'graph/floor':>11} {'speed-up':>8} tokens (eager vs graph)")
    kern = select_kernel("auto", "cuda", torch.bfloat16, 128)
    lean = select_kernel("lean", "cuda", torch.bfloat16, 128)
    steps = args.steps
    for n_layers in args.layers:
        model = _model(n_layers)
        a = model.args
        w_bytes = sum(p.numel() * p.element_size() for n_, p in model.named_parameters()
                      if not n_.startswith("tok_embeddings"))
        for B in args.batch:
            for n in args.ctx_model:
                kv_bytes = n_layers * 2 * B * n * a.n_kv_heads * a.head_dim * 2
                if kv_bytes + w_bytes > 120e9:
                    print(f"{n_layers:6} {B:2} {n:7}  skipped: {kv_bytes / 1e9:.0f} GB of KV does not fit")
                    continue
                floor = (w_bytes + kv_bytes) / bw / 1e9
                out = {}
                for mode, kn, products in (("false", kern, "auto"), ("false", lean, "auto"), ("true", kern, "auto"),
                                           ("true", kern, "torch")):
                    torch.cuda.empty_cache()
                    cache: dict = {}
                    r = ModelRunner(model, None, kn, prefill="local", decode="local", cuda_graphs=mode,
                                    graph_cache=cache, decode_products=products)
                    with torch.inference_mode():
                        r.prime(B, n, steps + 4)
                        torch.manual_seed(0)
                        r.cache.buf.normal_()
                        tok = torch.randint(0, a.vocab_size, (B,), device="cuda")
                        toks, ts = [], []
                        for i in range(steps + 3):
                            ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                            ev0.record()
                            logits = r.decode_step(tok)
                            ev1.record()
                            ev1.synchronize()
                            tok = r.next_token(logits)
                            toks.append(tok)
                            if i >= 3:          # the first graph step captures; warm-up
                                ts.append(ev0.elapsed_time(ev1))
                    out[(mode, kn.name, products)] = (sorted(ts)[len(ts) // 2], torch.stack(toks[:4]).cpu(),
                                                      r.graph_attrs())
                    del r, cache
                out = {k[:2] if k[2] == "auto" else "cublas": v for k, v in out.items()}
                te, tl_, tg = out[("false", kern.name)][0], out[("false", "lean")][0], out[("true", kern.name)][0]
                tc = out["cublas"][0]
                same = bool(torch.equal(out[("false", kern.name)][1], out[("true", kern.name)][1]))
                print(f"{n_layers:6} {B:2} {n:7} {(w_bytes + kv_bytes) / 1e9:8.2f} {floor:7.3f} {te:8.3f} {tl_:8.3f} "
                      f"{tc:8.3f} {tg:8.3f} {te / floor:10.2f}x {tl_ / floor:10.2f}x {tg / floor:10.2f}x {te / tg:7.2f}x "
                      f"{'same' if same else 'differ'} ({out[('true', kern.name)][2]['cuda_graphs']})")
                emit("model", layers=n_layers, batch=B, context=n, bytes=w_bytes + kv_bytes, floor_ms=floor,
                     eager_ms=te, eager_lean_ms=tl_, graph_cublas_ms=tc, graph_ms=tg, first_tokens_equal=same,
                     graph=out[("true", kern.name)][2])
                save(args.json)
        del model
        torch.cuda.empty_cache()


def hf_step(args, bw):
    import transformers
    print(f"\n## Hugging Face transformers {transformers.__version__}: LlamaForCausalLM, StaticCache, sdpa (ms);"
          f" modes: {' '.join(args.hf_modes)}")
    print("   eager: plain forward; compile: forward under torch.compile(mode='reduce-overhead', fullgraph=True),"
          " HF's documented fastest decode (CUDA graphs of inductor kernels), compiled per shape")
    for n_layers in args.layers:
        _hf_layers(args, n_layers)


def _hf_model(n_layers):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=n_layers,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=1 << 20,
                      rope_theta=500000.0, attn_implementation="sdpa")
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            return cfg, LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(prev)


def _hf_layers(args, n_layers):
    """HF decode step at every (B, context) of the model section, per mode. No prefill is run: the
    StaticCache holds _hf_capacity(n) positions and the timed steps sit at positions n+1, n+2, ...
    HF's sdpa decode reads the whole static capacity under a mask whatever the values, so the
    step's time does not depend on the cache contents (and a 128K prefill through HF's masked sdpa
    would need a materialised n x n mask)."""
    import transformers
    cfg, model = _hf_model(n_layers)
    for mode in args.hf_modes:
        for B in args.batch:
            for n in args.ctx_model:
                kv_bytes = n_layers * 2 * B * _hf_capacity(n) * cfg.num_key_value_heads * cfg.head_dim * 2
                if kv_bytes > 100e9:
                    print(f"  {mode} {n_layers} layers B={B} N={n}: skipped ({kv_bytes / 1e9:.0f} GB of KV)")
                    continue
                if mode == "compile" and (n_layers, B) not in args.hf_compile_shapes:
                    continue
                try:
                    t, t_compile = _hf_time(model, cfg, mode, B, n)
                    print(f"  {mode:7} {n_layers:2} layers B={B} N={n:7}: {t:.3f} ms"
                          + (f"  (compile + capture {t_compile:.0f} s)" if t_compile else ""), flush=True)
                    emit("hf", mode=mode, layers=n_layers, batch=B, context=n, ms=t, compile_s=t_compile,
                         version=transformers.__version__)
                except Exception as e:
                    print(f"  {mode} {n_layers} layers B={B} N={n}: {type(e).__name__}: {str(e)[:300]}")
                torch.cuda.empty_cache()
                save(args.json)
    del model
    torch.cuda.empty_cache()


HF_WARMUP, HF_STEPS = 3, 10


def _hf_capacity(n: int) -> int:
    """StaticCache length for a context of n: the initialising step, warm-up and timed steps."""
    return n + 1 + HF_WARMUP + HF_STEPS


def _hf_time(model, cfg, mode, B, n, device="cuda"):
    """(median ms of one decode step at context n, seconds spent compiling) for one HF mode.

    One eager step at position n first initialises the StaticCache's layers outside any compiled
    region (HF marks their tensors as static addresses there; a cache first built inside the
    compiled graph makes inductor skip CUDA graphs), and sets a layer's write counter, where the
    HF version keeps one, to n + 1, so that every timed step writes its own slot."""
    from transformers import StaticCache
    warmup, steps = HF_WARMUP, HF_STEPS
    cache = StaticCache(config=cfg, max_cache_len=_hf_capacity(n))
    tok = torch.randint(0, cfg.vocab_size, (B, 1), device=device)
    t_compile = 0.0
    ts = []
    with torch.inference_mode():
        model(input_ids=tok, past_key_values=cache, cache_position=torch.tensor([n], device=device),
              use_cache=True)
        for layer in getattr(cache, "layers", []):
            if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor):
                layer.cumulative_length.fill_(n + 1)
        fwd = model.forward
        if mode == "compile":
            torch._dynamo.reset()       # one compiled graph per shape, no dynamic-shape recompiles
            fwd = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True, dynamic=False)
        for i in range(warmup + steps):
            pos = torch.tensor([n + 1 + i], device=device)
            t0 = time.time()
            if device == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
            o = fwd(input_ids=tok, past_key_values=cache, cache_position=pos, use_cache=True)
            if device == "cuda":
                b.record()
                b.synchronize()
            if i < warmup and mode == "compile":
                t_compile += time.time() - t0
            tok = o.logits[:, -1:].argmax(-1).clone()
            if i >= warmup:
                ts.append(a.elapsed_time(b) if device == "cuda" else (time.time() - t0) * 1e3)
    del cache, o
    return sorted(ts)[len(ts) // 2], t_compile


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", nargs="+", default=["ceiling", "lean", "gemv", "attn", "model", "hf"])
    ap.add_argument("--ctx-b1", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 131072, 1048576])
    ap.add_argument("--ctx-attn", type=int, nargs="+", default=[4096, 16384, 131072, 1048576])
    ap.add_argument("--ctx-model", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 32])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--lean-sweep", choices=("small", "wide"), default="small",
                    help="Lean configurations the lean section times (LEAN_SWEEP / LEAN_SWEEP_WIDE)")
    ap.add_argument("--gemv-sweep", type=int, default=len(GEMV_SWEEP), help="how many gemv configurations to sweep")
    ap.add_argument("--json", default=None)
    ap.add_argument("--hf-modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile"])
    ap.add_argument("--hf-compile-shapes", nargs="+", default=["32x1", "4x1", "32x8"],
                    help="LAYERSxB pairs that HF's compile mode runs (each context compiles anew)")
    ap.add_argument("--flush", choices=("write", "read"), default="write",
                    help="L2 eviction before timed kernel calls (class Flush)")
    args = ap.parse_args()
    args.hf_compile_shapes = {tuple(int(x) for x in p.split("x")) for p in args.hf_compile_shapes}
    global FLUSH_MODE
    FLUSH_MODE = args.flush
    RESULTS.update(device=torch.cuda.get_device_name(0), torch=torch.__version__,
                   date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), argv=" ".join(sys.argv),
                   flush=args.flush)
    print(f"# {RESULTS['device']}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, {RESULTS['date']}")
    bw = ceiling(args) if "ceiling" in args.sections else 4.5
    if "ceiling" not in args.sections:
        print("# ceiling section not run: floors below divide by an assumed 4.5 TB/s, not a measured rate")
    for name, fn in (("lean", lean_vs_cudnn), ("leanprof", lean_profile), ("gemv", gemv_products), ("attn", attn_step),
                     ("model", model_step), ("hf", hf_step)):
        if name in args.sections:
            t0 = time.time()
            try:
                fn(args, bw)
            except Exception as e:
                import traceback
                traceback.print_exc()
                print(f"section {name} failed: {type(e).__name__}: {e}")
            print(f"# section {name}: {time.time() - t0:.0f} s", flush=True)
            save(args.json)


if __name__ == "__main__":
    main()

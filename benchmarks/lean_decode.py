"""Decode attention benchmark: hpcattn's LeanAttention (stream-K Triton) vs cuDNN / flash aten ops.

    python benchmarks/lean_decode.py                      # all cases, default config
    python benchmarks/lean_decode.py --cases b1 --ctx 16384 131072
    python benchmarks/lean_decode.py --tune [--quick]     # sweep block_n/num_warps/num_stages/P
    python benchmarks/lean_decode.py --json out.json      # also dump every row

Cases (spec lean_attention.md section 6; Hq=32, Hkv=8, d=128, bf16 unless flags say otherwise):
  b1    B=1, context 4K .. 1M
  b16   B=16 ragged, lengths log-uniform in [1K, 128K] (fixed seed), capacity 128K
  b64   B=64, 8K each

Every implementation runs in this one process on the same head-major KV (a (B, N, H, d) view of a
contiguous (B, H, N, d) buffer, hpcattn's KV layout; the aten ops get (B, H, N, d) without copies):
  lean         hpcattn.kernels.lean.lean_decode (two-kernel reduction; --reduction fused too)
  cudnn        aten._scaled_dot_product_cudnn_attention, native GQA: q (B,Hq,1,d), k/v (B,Hkv,N,d)
  flash        aten._scaled_dot_product_flash_attention, native GQA (GQA fold if that is refused)
  flashinfer   flashinfer.single_decode_with_kv_cache (B=1 only; only if it imports)
  For ragged batches the aten ops have no length argument: 'cudnn-pad' / 'flash-pad' read the
  whole padded capacity, 'cudnn-loop' calls per sequence on its own keys. Bandwidth is always
  bytes_min / time (real lengths), so padded baselines pay for their extra reads.
  read-ceiling torch.sum over a buffer of the case's KV bytes ('sum' row), and a large-buffer sum
               measured once at start: the 'ceiling' every % column refers to.

Timing: CUDA events around each call, L2 flushed before every timed call (a 512 MB buffer write,
disable with --no-flush), warm-up, median of --reps; each implementation is captured into a CUDA
graph when possible (--no-graph to time eager launches). Any implementation that fails (op
missing, capture refused) prints its reason and the table goes on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------------------
# timing


class Timer:
    def __init__(self, flush_mb: int, reps: int, warmup: int, graph: bool):
        self.flush = torch.empty(flush_mb * 2 ** 20 // 4, dtype=torch.float32, device="cuda") if flush_mb else None
        self.reps, self.warmup, self.graph = reps, warmup, graph

    def _flush(self):
        if self.flush is not None:
            self.flush.fill_(1.0)

    def time(self, fn, reps: int | None = None) -> tuple[float, str]:
        """Median ms of fn over reps, L2 flushed before each; returns (ms, 'graph'|'eager')."""
        reps = reps or self.reps
        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize()
        run, mode = fn, "eager"
        if self.graph:
            try:
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    fn()
                torch.cuda.current_stream().wait_stream(s)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    fn()
                g.replay()
                torch.cuda.synchronize()
                run, mode = g.replay, "graph"
            except Exception:
                torch.cuda.synchronize()
        a = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        b = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            self._flush()
            a[i].record()
            run()
            b[i].record()
        torch.cuda.synchronize()
        ts = sorted(x.elapsed_time(y) for x, y in zip(a, b))
        return ts[len(ts) // 2], mode


def read_ceiling(timer: Timer, nbytes: int) -> float:
    """TB/s of torch.sum over a bf16 buffer of nbytes (streaming read)."""
    buf = torch.ones(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    ms, _ = timer.time(lambda: buf.sum(dtype=torch.float32))
    del buf
    return nbytes / ms / 1e9


# ------------------------------------------------------------------------------------------------
# implementations: each takes (q (B,1,Hq,d), k, v (B,N,Hkv,d) head-major views, lengths, scale)
# and returns a zero-argument callable plus a function that gives (out (B,Hq,d) fp32, lse (B,Hq))


def impl_lean(q, k, v, lengths, scale, **cfg):
    from hpcattn.kernels.lean import lean_decode
    full = all(n == k.shape[1] for n in lengths)
    kl = None if full else lengths

    def fn():
        return lean_decode(q, k, v, scale=scale, k_lengths=kl, **cfg)

    def result():
        o, l = fn()
        return o[:, 0].float(), l[:, :, 0]
    return fn, result


def _cudnn_call(qh, kh, vh, scale):
    r = torch.ops.aten._scaled_dot_product_cudnn_attention(qh, kh, vh, None, True, 0.0, False, False,
                                                           scale=scale)
    lse = r[1]
    return r[0], (lse.squeeze(-1) if lse.dim() == 4 else lse)


def _flash_call(qh, kh, vh, scale):
    B, Hq, _, d = qh.shape
    Hkv = kh.shape[1]
    try:
        r = torch.ops.aten._scaled_dot_product_flash_attention(qh, kh, vh, 0.0, False, False, scale=scale)
        return r[0], r[1]
    except RuntimeError:
        if Hq == Hkv:
            raise
    qf = qh.reshape(B, Hkv, Hq // Hkv, d)         # GQA fold: rows (g) of each KV head
    r = torch.ops.aten._scaled_dot_product_flash_attention(qf, kh, vh, 0.0, False, False, scale=scale)
    return r[0].reshape(B, Hq, 1, d), r[1].reshape(B, Hq, 1)


def impl_aten(call, mode):
    """mode: 'dense' (all keys), 'pad' (padded capacity), 'loop' (per-sequence calls)."""
    def make(q, k, v, lengths, scale):
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # free for head-major
        if mode == "loop":
            pieces = [(qh[b:b + 1], kh[b:b + 1, :, :n], vh[b:b + 1, :, :n])
                      for b, n in enumerate(lengths) if n > 0]
            if len(pieces) != len(lengths):
                raise RuntimeError("per-sequence loop: a length is 0")

            def fn():
                return [call(a, b_, c, scale) for a, b_, c in pieces]

            def result():
                rs = fn()
                return (torch.cat([r[0][:, :, 0].float() for r in rs]),
                        torch.cat([r[1][:, :, 0].float() for r in rs]))
            return fn, result

        def fn():
            return call(qh, kh, vh, scale)

        def result():
            o, l = fn()
            return o[:, :, 0].float(), l[:, :, 0].float()
        return fn, result
    return make


def impl_flashinfer(q, k, v, lengths, scale):
    import flashinfer                              # optional; raises ImportError if absent
    if q.shape[0] != 1:
        raise RuntimeError("flashinfer single decode: B=1 only here")
    qs = q[0, 0]                                   # (Hq, d)
    kh, vh = k[0].transpose(0, 1), v[0].transpose(0, 1)   # (Hkv, N, d) contiguous: HND layout

    def fn():
        return flashinfer.single_decode_with_kv_cache(qs, kh, vh, kv_layout="HND", sm_scale=scale,
                                                      return_lse=True)

    def result():
        o, l = fn()
        return o[None].float(), l[None].float() * math.log(2.0)      # base-2 lse -> natural
    return fn, result


# ------------------------------------------------------------------------------------------------
# cases


def make_cases(args):
    cases = []
    if "b1" in args.cases:
        for n in args.ctx:
            cases.append((f"B1 N{n // 1024}K", 1, [n], n))
    if "b16" in args.cases:
        rnd = random.Random(0)
        lengths = [int(2 ** rnd.uniform(10, 17)) for _ in range(16)]
        cases.append(("B16 ragged 1K-128K", 16, lengths, 131072))
    if "b64" in args.cases:
        cases.append(("B64 N8K", 64, [8192] * 64, 8192))
    return cases


def setup_case(B, lengths, cap, args):
    dt = DTYPES[args.dtype]
    g = torch.Generator(device="cuda").manual_seed(0)
    kb = torch.randn(B, args.hkv, cap, args.d, device="cuda", dtype=dt, generator=g)
    vb = torch.randn(B, args.hkv, cap, args.d, device="cuda", dtype=dt, generator=g)
    qb = torch.randn(B, args.hq, 1, args.d, device="cuda", dtype=dt, generator=g)
    # hpcattn views: (B, S, H, d) of head-major buffers
    q, k, v = qb.transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2)
    e = kb.element_size()
    nbytes = sum(lengths) * 2 * args.hkv * args.d * e + 2 * B * args.hq * args.d * e
    return q, k, v, nbytes


def implementations(args, ragged):
    impls = [("lean", lambda q, k, v, l, s: impl_lean(q, k, v, l, s, **lean_cfg(args)))]
    if args.reduction == "both":
        impls.append(("lean-fused", lambda q, k, v, l, s: impl_lean(q, k, v, l, s, **lean_cfg(args, "fused"))))
    if ragged:
        impls += [("cudnn-pad", impl_aten(_cudnn_call, "pad")), ("cudnn-loop", impl_aten(_cudnn_call, "loop")),
                  ("flash-pad", impl_aten(_flash_call, "pad"))]
    else:
        impls += [("cudnn", impl_aten(_cudnn_call, "dense")), ("flash", impl_aten(_flash_call, "dense")),
                  ("flashinfer", impl_flashinfer)]
    return impls


def lean_cfg(args, reduction=None):
    cfg = {"reduction": reduction or ("two_kernel" if args.reduction == "both" else args.reduction)}
    for key in ("block_n", "num_warps", "num_stages", "num_programs"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    return cfg


def reference(q, k, v, lengths, scale):
    """fp32 reference (B, Hq, d), (B, Hq) on the real lengths, one sequence at a time (GQA grouped,
    KV never expanded)."""
    Hkv, d = k.shape[2], k.shape[3]
    G = q.shape[2] // Hkv
    outs, lses = [], []
    for b, n in enumerate(lengths):
        qq = q[b, 0].float().view(Hkv, G, d)
        kk, vv = k[b, :n].float(), v[b, :n].float()                   # (n, Hkv, d)
        s = torch.einsum("hgd,nhd->hgn", qq, kk) * scale
        lse = torch.logsumexp(s, -1)
        outs.append(torch.einsum("hgn,nhd->hgd", torch.exp(s - lse[..., None]), vv).reshape(Hkv * G, d))
        lses.append(lse.reshape(Hkv * G))
        del kk, vv, s
    return torch.stack(outs), torch.stack(lses)


def run_case(name, B, lengths, cap, args, timer, ceiling, rows):
    q, k, v, nbytes = setup_case(B, lengths, cap, args)
    scale = args.d ** -0.5
    ragged = len(set(lengths)) > 1
    ro, rl = reference(q, k, v, lengths, scale) if args.check else (None, None)
    results = []
    for iname, make in implementations(args, ragged):
        try:
            fn, result = make(q, k, v, lengths, scale)
            err = ""
            if ro is not None:
                o, l = result()
                err = f"{(o - ro).abs().max().item():.1e}/{(l - rl).abs().max().item():.1e}"
            ms, mode = timer.time(fn)
            results.append((iname, ms, mode, err))
        except Exception as e:  # an op this build lacks, a capture it refuses: report and go on
            msg = str(e).splitlines()[0][:80] if str(e) else ""
            print(f"  {name:20} {iname:12} unavailable: {type(e).__name__}: {msg}")
    buf = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").fill_(1)
    sum_ms, _ = timer.time(lambda: buf.sum(dtype=torch.float32))
    del buf
    results.append(("sum", sum_ms, "-", ""))
    base = min((ms for n, ms, _, _ in results if n.startswith("cudnn")), default=None)
    for iname, ms, mode, err in results:
        tbs = nbytes / ms / 1e9
        vs = f"{base / ms:6.2f}x" if base else "     -"
        print(f"{name:20} {iname:12} {ms:9.4f} {tbs:7.3f} {100 * tbs / ceiling:6.1f}% {vs}  {mode:5} {err}")
        rows.append(dict(case=name, B=B, lengths=lengths, impl=iname, ms=ms, tbs=tbs,
                         pct_ceiling=100 * tbs / ceiling, vs_cudnn=(base / ms) if base else None,
                         mode=mode, err_out_lse=err, kv_bytes=nbytes))
    del q, k, v
    torch.cuda.empty_cache()


def tune_case(name, B, lengths, cap, args, timer, ceiling):
    from hpcattn.kernels.lean import lean_decode
    q, k, v, nbytes = setup_case(B, lengths, cap, args)
    scale = args.d ** -0.5
    kl = None if len(set(lengths)) == 1 else lengths
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    bns = [32, 64, 128] + ([256] if args.d <= 64 else [])
    warps = [4] if args.quick else [2, 4, 8]
    stages = [2, 3] if args.quick else [2, 3, 4]
    progs = [1, 2, 4] if args.quick else [1, 2, 3, 4, 8]
    reds = ["two_kernel", "fused"]
    ro, rl = reference(q, k, v, lengths, scale)
    best = []
    for bn in bns:
        for w in warps:
            for st in stages:
                for pm in progs:
                    for red in reds:
                        cfg = dict(block_n=bn, num_warps=w, num_stages=st, num_programs=pm * sms,
                                   reduction=red)
                        try:
                            o, l = lean_decode(q, k, v, scale=scale, k_lengths=kl, **cfg)
                            eo = (o[:, 0].float() - ro).abs().max().item()
                            if not eo < 0.05:
                                raise RuntimeError(f"wrong result, err {eo:.2e}")
                            ms, _ = timer.time(lambda: lean_decode(q, k, v, scale=scale, k_lengths=kl, **cfg),
                                               reps=max(5, args.reps // 4))
                            best.append((ms, cfg))
                        except Exception as e:
                            print(f"  {name} {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}")
    best.sort(key=lambda x: x[0])
    for ms, cfg in best[:args.top]:
        tbs = nbytes / ms / 1e9
        print(f"{name:20} {ms:9.4f} ms {tbs:7.3f} TB/s {100 * tbs / ceiling:6.1f}%  "
              f"block_n={cfg['block_n']} warps={cfg['num_warps']} stages={cfg['num_stages']} "
              f"P={cfg['num_programs']} ({cfg['num_programs'] // sms}xSM) {cfg['reduction']}")
    del q, k, v
    torch.cuda.empty_cache()
    return best[0] if best else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["b1", "b16", "b64"], choices=["b1", "b16", "b64"])
    ap.add_argument("--ctx", nargs="+", type=int,
                    default=[4096, 8192, 16384, 32768, 65536, 131072, 262144, 524288, 1048576])
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--flush-mb", type=int, default=512, help="L2 flush buffer written before each call")
    ap.add_argument("--no-flush", action="store_true")
    ap.add_argument("--no-graph", action="store_true", help="time eager launches, not CUDA graph replays")
    ap.add_argument("--no-check", dest="check", action="store_false", help="skip the error columns")
    ap.add_argument("--reduction", default="both", choices=["two_kernel", "fused", "both"])
    ap.add_argument("--block-n", type=int, default=None)
    ap.add_argument("--num-warps", type=int, default=None)
    ap.add_argument("--num-stages", type=int, default=None)
    ap.add_argument("--num-programs", type=int, default=None)
    ap.add_argument("--tune", action="store_true", help="sweep lean's configuration per case")
    ap.add_argument("--quick", action="store_true", help="smaller --tune sweep")
    ap.add_argument("--top", type=int, default=3, help="configs printed per case by --tune")
    ap.add_argument("--json", default=None, help="write all rows to this file")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        sys.exit("lean_decode benchmark: needs a CUDA GPU")
    import triton
    props = torch.cuda.get_device_properties(0)
    timer = Timer(0 if args.no_flush else args.flush_mb, args.reps, args.warmup, not args.no_graph)
    ceiling = read_ceiling(timer, 2 * 2 ** 30)
    print(f"# {props.name}, {props.multi_processor_count} SMs | torch {torch.__version__} | triton "
          f"{triton.__version__} | cuDNN {torch.backends.cudnn.version()} | {args.dtype} Hq={args.hq} "
          f"Hkv={args.hkv} d={args.d}")
    print(f"# L2 flush: {'off' if args.no_flush else f'{args.flush_mb} MB write before each call'} | "
          f"{'CUDA graphs' if not args.no_graph else 'eager'} | median of {args.reps} | "
          f"read ceiling (sum over 2 GiB): {ceiling:.3f} TB/s")
    cases = make_cases(args)
    t0 = time.time()
    if args.tune:
        print(f"{'case':20} {'time':>12} {'bandwidth':>12} {'%ceil':>6}  config")
        for name, B, lengths, cap in cases:
            tune_case(name, B, lengths, cap, args, timer, ceiling)
        print(f"# tune took {time.time() - t0:.0f} s")
        return
    print(f"{'case':20} {'impl':12} {'ms':>9} {'TB/s':>7} {'%ceil':>7} {'vs cuDNN':>7}  {'mode':5} "
          f"{'err out/lse' if args.check else ''}")
    rows = []
    for name, B, lengths, cap in cases:
        run_case(name, B, lengths, cap, args, timer, ceiling, rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=props.name, torch=torch.__version__, triton=triton.__version__,
                           ceiling_tbs=ceiling, flush_mb=0 if args.no_flush else args.flush_mb,
                           graphs=not args.no_graph, args=vars(args), rows=rows), f, indent=1)
    print(f"# took {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()

"""Probe: which aten call shape reads a decode KV cache fastest? (B=1, Hq=32, Hkv=8, d=128, bf16)

    python benchmarks/decode_kernel_probe.py [N ...]

Compares SDPA (enable_gqa, no LSE), the cuDNN/flash ops with native GQA, with the GQA fold, and
split-KV (the sequence cut into ns pieces laid on the batch dim as strided views, then merged).
Prints ms and achieved TB/s (KV bytes / time) per variant.
"""

import sys

import torch
import torch.nn.functional as F

from hpcattn.kernels.merge import merge_states

torch.backends.cuda.matmul.allow_tf32 = True
dev = "cuda"
Hq, Hkv, d = 32, 8, 128
G = Hq // Hkv
scale = d ** -0.5


def bench(fn, reps=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(reps):
        a.record(); fn(); b.record(); b.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]


def cudnn(q, k, v):
    r = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False, scale=scale)
    return r[0], r[1]


def flash(q, k, v):
    r = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
    return r[0], r[1]


def split(op, q, k, v, ns, fold):
    N = k.shape[2]
    ks = k[0].view(Hkv, ns, N // ns, d).transpose(0, 1)            # (ns, Hkv, N/ns, d) strided view
    vs = v[0].view(Hkv, ns, N // ns, d).transpose(0, 1)
    if fold:
        qs = q.reshape(1, Hkv, G, d).expand(ns, Hkv, G, d)
    else:
        qs = q.expand(ns, Hq, 1, d)
    o, l = op(qs, ks, vs)
    o = o.reshape(ns, 1, Hq, 1, d).transpose(2, 3)                  # (ns, B, Sq, H, d)
    l = l.reshape(ns, 1, Hq, 1)
    return merge_states(o, l)


for N in [int(x) for x in sys.argv[1:]] or [131072, 1048576]:
    k = torch.randn(1, Hkv, N, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(1, Hq, 1, d, device=dev, dtype=torch.bfloat16)
    nbytes = 2 * k.numel() * 2
    ref = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(G, 1), v.float().repeat_interleave(G, 1))
    rows = []
    rows.append(("sdpa enable_gqa (no lse)", lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), None))
    qf = q.reshape(1, Hkv, G, d)
    for name, op in (("cudnn", cudnn), ("flash", flash)):
        rows.append((f"{name} native gqa", lambda op=op: op(q, k, v), "native"))
        rows.append((f"{name} fold", lambda op=op: op(qf, k, v), "fold"))
        for ns in (8, 16, 32, 64, 128):
            for fold in (True, False):
                rows.append((f"{name} split{ns} {'fold' if fold else 'gqa'}",
                             lambda op=op, ns=ns, fold=fold: split(op, q, k, v, ns, fold), "split"))
    print(f"N={N}  KV {nbytes / 1e9:.2f} GB")
    for name, fn, kind in rows:
        try:
            out = fn()
            if kind == "split":
                o = out[0].reshape(1, 1, Hq, d).transpose(1, 2)
            elif kind == "fold":
                o = out[0].reshape(1, Hq, 1, d)
            elif kind == "native":
                o = out[0]
            else:
                o = out
            err = (o.float() - ref).abs().max().item()
            ms = bench(fn)
            print(f"  {name:28} {ms:8.3f} ms  {nbytes / ms / 1e9:6.2f} TB/s  err {err:.1e}")
        except Exception as e:  # a variant this build cannot run
            print(f"  {name:28} failed: {str(e).splitlines()[0][:90]}")
    del k, v

"""Eager decode-attention cost when the cache length changes every call, as in real decode.

    PYTHONPATH=. python3 benchmarks/decode_growing_length.py --json runs/growing.json     # one GPU

Benchmarks that repeat one cache length (benchmarks/lean_decode.py, the decode job) let a kernel
reuse whatever it prepared for that length. A decode step adds one token, so every eager step
calls the kernel with a new length. For each backend (cuDNN, flash, efficient SDPA ops through
the project's adapter, and Lean) this times T back-to-back calls over a head-major cache, once at
one fixed length and once with the length growing by one per call, wall clock over the T calls
(host overhead included: that is what an eager step pays), B = 1, Hq = 32, Hkv = 8, d = 128, bf16.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpcattn.kernels import empty_head_major, select_kernel  # noqa: E402

BACKENDS = ("aten_cudnn", "aten_flash", "aten_efficient", "lean", "auto")   # auto: cuDNN chosen, decode routed to lean


def per_call_ms(kern, q, k, v, n0: int, calls: int, grow: bool, rounds: int = 3) -> float:
    """Median over ``rounds`` of (wall time of ``calls`` calls) / calls, in ms. ``grow``: every
    call has a length never used before (n0, n0 + 1, ...; later rounds continue upwards, so no
    round reuses what an earlier one prepared), else every call has length n0. The first round warms up."""
    scale = q.shape[-1] ** -0.5
    times, nxt = [], n0
    for _ in range(rounds + 1):
        lengths = list(range(nxt, nxt + calls)) if grow else [n0] * calls
        nxt += calls if grow else 0
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for n in lengths:
            kern(q, k[:, :n], v[:, :n], scale=scale)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3 / calls)
    return statistics.median(times[1:])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default="8192,32768,131072")
    p.add_argument("--calls", type=int, default=32)
    p.add_argument("--json")
    a = p.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    rows = []
    for n0 in (int(x) for x in a.contexts.split(",")):
        cap = n0 + 4 * a.calls + 8      # 4 rounds of fresh lengths
        q = torch.randn(1, 1, 32, 128, device=dev, dtype=dt)
        k = empty_head_major(1, cap, 8, 128, dtype=dt, device=dev).normal_()
        v = empty_head_major(1, cap, 8, 128, dtype=dt, device=dev).normal_()
        for name in BACKENDS:
            try:
                kern = select_kernel(name, dev, dt, 128)
                fixed = per_call_ms(kern, q, k, v, n0, a.calls, grow=False)
                grow = per_call_ms(kern, q, k, v, n0, a.calls, grow=True)
            except Exception as e:  # noqa: BLE001 (a backend missing on this machine is a row, not a crash)
                print(f"{name:15} N={n0:<7} failed: {type(e).__name__}: {e}", flush=True)
                rows.append({"backend": name, "context": n0, "error": f"{type(e).__name__}: {e}"})
                continue
            print(f"{name:15} N={n0:<7} fixed {fixed:8.4f} ms/call   growing {grow:8.4f} ms/call   "
                  f"x{grow / fixed:5.2f}", flush=True)
            rows.append({"backend": name, "context": n0, "fixed_ms": fixed, "growing_ms": grow})
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "cudnn": torch.backends.cudnn.version(), "date": time.strftime("%Y-%m-%d", time.gmtime())}
    if a.json:
        Path(a.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

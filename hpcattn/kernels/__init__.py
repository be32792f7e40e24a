"""Local attention kernels returning the attention state ``(out, lse)``, and backend selection.

Convention (everything past this package relies on it)::

    q: (B, Sq, Hq, d)      k, v: (B, Sk, Hkv, d)      Hq % Hkv == 0   (flash layout)
    out: (B, Sq, Hq, d) in q.dtype
    lse: (B, Hq, Sq) float32 (float64 for the float64 reference), natural log, softmax scale
         included; the empty state (no visible key) is out = 0, lse = -inf.

``causal`` is ``none`` | ``square`` (Sq == Sk) | ``bottom_right`` (last query row aligned with the
last key). ``k_lengths`` (B,) makes a ragged batch: sequence b sees keys [0, k_lengths[b]).

Backends: ``torch_ref`` (plain torch math, CPU/GPU, any dtype), ``cpu_flash`` (aten's CPU flash
kernel), ``aten_cudnn`` / ``aten_flash`` / ``aten_efficient`` (PyTorch's GPU ops), ``fa2``
(flash-attn, when importable), ``lean`` (hpcattn's stream-K Triton decode kernel, GPU, decode
shapes only; it reads lengths from the device, so CUDA graphs of a growing cache use it).
``auto`` picks, in order of measured speed, the first one that is present and passes a startup
self-test against ``torch_ref`` for the run's dtype and head size. On a GPU it sends ragged decode
batches (``k_lengths`` not all equal, G*Sq <= 128, fp16/bf16) to ``lean``, which beat cuDNN's
per-sequence loop there, and dense decode calls of cuDNN to ``aten_flash`` when eager and to
``lean`` inside a CUDA graph capture: PyTorch's cuDNN op builds a new graph on the host for every new
key length (37-56 ms per call on an H200), which every eager decode step pays; flash has no
per-length cost and was the fastest eager call measured with growing lengths, Lean the fastest
graph replay at every context 4K-1M (docs/performance.md). Without flash, ``lean`` takes both.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from hpcattn.errors import HpcattnError
from hpcattn.kernels import backends
from hpcattn.kernels.capture import building
from hpcattn.kernels.merge import (empty_state, lse_as_out, merge_pair, merge_states,  # noqa: F401
                                   pack_states, sanitize_lse, unpack_states)
from hpcattn.kernels.reference import attn_reference  # noqa: F401

log = logging.getLogger("hpcattn")

GPU_ORDER = ("aten_cudnn", "fa2", "aten_flash", "aten_efficient")
CPU_ORDER = ("cpu_flash", "torch_ref")


@dataclass
class Kernel:
    """A selected local attention backend. Call it like :func:`attn_with_lse` without ``backend``."""

    name: str
    native_gqa: bool = True
    selftest: dict = field(default_factory=dict)
    auto: bool = False            # chosen by ``auto``: ragged GPU decode batches may go to lean
    decode_route: tuple[str, str] | None = None   # auto's (eager, captured) kernels for cuDNN's dense decode

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                 causal: str = "none", k_lengths: list[int] | None = None):
        B, Sq, Hq, d = q.shape
        Sk = k.shape[1]
        if Sk == 0 or Sq == 0:
            out, lse = empty_state(B, Sq, Hq, d, dtype=q.dtype, device=q.device)
            return out, lse.to(torch.float64) if q.dtype == torch.float64 else lse
        if self.name == "lean":                       # stream-K decode kernel: ragged natively
            from hpcattn.kernels.lean import lean_decode
            return lean_decode(q, k, v, scale=scale, causal=causal, k_lengths=k_lengths)
        if k_lengths is not None and any(n != Sk for n in k_lengths):
            return self._ragged(q, k, v, scale=scale, causal=causal, k_lengths=k_lengths)
        if self.decode_route is not None:
            other = _decode_kernel(self, q, k, causal, "decode")
            if other is not None:
                return other(q, k, v, scale=scale, causal=causal)
        return self._dense(q, k, v, scale=scale, causal=causal)

    def _dense(self, q, k, v, *, scale, causal):
        if self.name == "torch_ref":
            return backends.ref_attention(q, k, v, causal=causal, scale=scale)
        if self.name == "fa2":
            return backends.fa2_attention(q, k, v, causal=causal, scale=scale)
        return backends.raw_attention(backends.RAW_KERNELS[self.name], q, k, v, causal=causal,
                                      scale=scale, native_gqa=self.native_gqa)

    def _ragged(self, q, k, v, *, scale, causal, k_lengths):
        """Per-sequence calls over each sequence's own keys: no padding is read. Under ``auto`` on
        a GPU, a ragged decode batch goes to the Lean kernel instead (one launch for the batch;
        measured 1.29x cuDNN's per-sequence loop at B=8 and 1.35x at B=16 on an H200)."""
        lean = _decode_kernel(self, q, k, causal, "ragged")
        if lean is not None:
            return lean(q, k, v, scale=scale, causal=causal, k_lengths=k_lengths)
        outs, lses = [], []
        for b, n in enumerate(k_lengths):
            if n == 0:
                o, l = empty_state(1, q.shape[1], q.shape[2], q.shape[3], dtype=q.dtype, device=q.device)
            else:
                o, l = self._dense(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n], scale=scale, causal=causal)
            outs.append(o)
            lses.append(l.to(torch.float64 if q.dtype == torch.float64 else torch.float32))
        return torch.cat(outs), torch.cat(lses)


def _decode_kernel(kern: Kernel, q: torch.Tensor, k: torch.Tensor, causal: str, why: str) -> Kernel | None:
    """The kernel for a decode call of an ``auto`` GPU kernel, or None (keep ``kern``).

    ``why="ragged"``: ``lean`` for a ragged batch (one launch instead of a per-sequence loop).
    ``why="decode"``: a dense decode call of cuDNN goes to ``kern.decode_route``'s eager kernel
    (``aten_flash``, else ``lean``), or its captured one (``lean``) while a CUDA graph is being
    built (:func:`hpcattn.kernels.capture.building`: warm-up and capture) or captured. PyTorch's cuDNN op
    builds a new cuDNN graph on the host for every new key length (measured on an H200: 37-56 ms
    of host time per call, ~0.03 ms on the GPU), and every eager decode step has a new length.
    """
    if not (kern.auto and q.is_cuda and kern.name in GPU_ORDER and causal in ("none", "bottom_right")
            and q.dtype in (torch.float16, torch.bfloat16) and (q.shape[2] // k.shape[2]) * q.shape[1] <= 128):
        return None
    if why == "ragged":
        name = "lean"
    else:
        name = kern.decode_route[1 if building() or torch.cuda.is_current_stream_capturing() else 0]
    try:
        other = select_kernel(name, q.device, q.dtype, q.shape[-1])
    except HpcattnError:
        return None
    if why == "ragged":
        kern.selftest.setdefault("ragged", "lean")
    return other


def _tolerance(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-9, torch.float32: 2e-4}.get(dtype, 3e-2)


def _selftest(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> tuple[bool, bool, str]:
    """Run ``name`` on tiny problems against torch_ref. Returns (ok, native_gqa, reason)."""
    g = torch.Generator(device="cpu").manual_seed(1234)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    scale = head_dim ** -0.5
    cases = [  # (Sq, Sk, Hq, Hkv, causal)
        (37, 37, 4, 4, "square"), (37, 37, 4, 2, "none"), (5, 70, 4, 2, "bottom_right"),
        (1, 45, 8, 2, "none"), (33, 33, 4, 4, "none"),
    ]
    if name == "lean":         # a decode kernel: decode-shaped cases only
        cases = [(1, 45, 8, 2, "none"), (1, 300, 32, 8, "none"), (3, 200, 8, 2, "bottom_right")]
    tol = _tolerance(dtype)
    kern = Kernel(name, native_gqa=False)
    try:
        for sq, sk, hq, hkv, causal in cases:
            q, k, v = rnd(2, sq, hq, head_dim), rnd(2, sk, hkv, head_dim), rnd(2, sk, hkv, head_dim)
            o, l = kern(q, k, v, scale=scale, causal=causal)
            ro, rl = attn_reference(q, k, v, scale=scale, causal=causal)
            eo = (o.double() - ro.double()).abs().max().item()
            el = (l.double() - rl.double()).abs().max().item()
            if not (eo <= tol and el <= tol):
                return False, False, f"mismatch vs torch_ref (causal={causal}): out {eo:.2e}, lse {el:.2e}"
    except Exception as e:  # a backend that cannot run here is disabled, with the reason logged
        return False, False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    native = False
    try:  # does the kernel do causal GQA without expanding KV heads?
        q, k, v = rnd(1, 37, 4, head_dim), rnd(1, 37, 2, head_dim), rnd(1, 37, 2, head_dim)
        o, l = Kernel(name, native_gqa=True)(q, k, v, scale=scale, causal="square")
        ro, rl = attn_reference(q, k, v, scale=scale, causal="square")
        native = bool((o.double() - ro.double()).abs().max() <= tol and (l.double() - rl.double()).abs().max() <= tol)
    except Exception:
        native = False
    return True, native, "ok"


def head_major(t: torch.Tensor) -> torch.Tensor:
    """The same (B, S, H, d) tensor stored head-major: a (B, S, H, d) view of a contiguous
    (B, H, S, d) buffer, so the aten kernels read it without a copy. Use it for KV caches,
    ring buffers and prefill shards (one copy at set-up instead of one per kernel call)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def empty_head_major(B: int, S: int, H: int, d: int, *, dtype, device, lead: tuple = ()) -> torch.Tensor:
    """Uninitialised (*lead, B, S, H, d) view of a contiguous (*lead, B, H, S, d) buffer."""
    return torch.empty(*lead, B, H, S, d, dtype=dtype, device=device).transpose(-3, -2)


_CACHE: dict = {}


def select_kernel(backend: str, device: str | torch.device, dtype: torch.dtype, head_dim: int) -> Kernel:
    """Resolve ``backend`` (or ``auto``) to a :class:`Kernel` that passed its self-test.

    Raises HpcattnError when a named backend is not available or fails its self-test.
    """
    device = torch.device(device)
    key = (backend, device.type, dtype, head_dim)
    if key in _CACHE:
        return _CACHE[key]
    if backend == "torch_ref":
        kern = Kernel("torch_ref", True, {"torch_ref": "reference"})
        _CACHE[key] = kern
        return kern
    if backend == "auto":
        candidates = CPU_ORDER if device.type == "cpu" else GPU_ORDER + ("torch_ref",)
    else:
        candidates = (backend,)
    report = {}
    for name in candidates:
        if name == "torch_ref":
            kern = Kernel("torch_ref", True, report | {"torch_ref": "reference"})
            break
        if name == "fa2":
            try:
                import flash_attn  # noqa: F401
            except ImportError:
                report[name] = "flash-attn not installed"
                continue
        if (device.type == "cpu") != (name == "cpu_flash"):
            report[name] = f"not a {device.type} kernel"
            continue
        ok, native, reason = _selftest(name, device, dtype, head_dim)
        report[name] = reason
        if ok:
            kern = Kernel(name, native, report, auto=backend == "auto")
            break
        log.info("kernel %s disabled for %s/%s/d=%d: %s", name, device.type, dtype, head_dim, reason)
    else:
        raise HpcattnError(f"kernel.backend={backend}: no usable kernel on {device.type} for "
                           f"{str(dtype).replace('torch.', '')}, head_dim={head_dim}: "
                           + "; ".join(f"{k}: {v}" for k, v in report.items()))
    if kern.auto and kern.name == "aten_cudnn" and dtype in (torch.float16, torch.bfloat16):
        kern.decode_route, kern.selftest["decode"] = _decode_route(device, dtype, head_dim)
    _CACHE[key] = kern
    return kern


def _decode_route(device, dtype, head_dim) -> tuple[tuple[str, str] | None, str]:
    """Where ``auto`` sends cuDNN's dense decode calls: ((eager kernel, kernel under graph capture)
    or None to keep cuDNN, the text said in the record's kernel line)."""
    have, why = [], []
    for name in ("aten_flash", "lean"):
        try:
            select_kernel(name, device, dtype, head_dim)
            have.append(name)
        except HpcattnError as e:
            why.append(f"{name}: {str(e)[:80]}")
    if not have:
        return None, "aten_cudnn (" + "; ".join(why) + ")"
    route = (have[0], "lean" if "lean" in have else have[0])
    return route, (f"{route[0]} eager, {route[1]} in CUDA graphs "
                   "(cuDNN builds a host graph per new key length)")


def attn_with_lse(q, k, v, *, scale: float, causal: str = "none", backend: str = "auto",
                  k_lengths: list[int] | None = None):
    """Attention state of q over (k, v) with the named backend; see the package docstring."""
    return select_kernel(backend, q.device, q.dtype, q.shape[-1])(
        q, k, v, scale=scale, causal=causal, k_lengths=k_lengths)

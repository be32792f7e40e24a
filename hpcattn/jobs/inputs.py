"""Job inputs: synthesized from a seed, or read from an HDF5 file.

Synthetic tensors are generated in fixed chunks of tokens, each chunk from its own seed
(seed, tensor name, chunk index), so a rank can generate exactly its shard and the global tensor
is the same whatever the number of ranks or the layout. Values are standard normal, generated on
the run's device (CPU and GPU streams differ; a run never mixes them).

Input file layout (``inputs.source: file``), documented in docs/inputs.md::

    /q  (B, Sq, Hq, d)    decode: the query rows (Sq >= 1); prefill: Sq == N
    /k  (B, N, Hkv, d)
    /v  (B, N, Hkv, d)
    /lengths (B,) int     optional, decode only: valid KV tokens per sequence (ragged batch)

Datasets may be float16/float32/float64, or uint16 with attribute ``dtype_original="bfloat16"``
(raw bf16 bits). They are converted to ``shape.dtype``.
"""

from __future__ import annotations

import hashlib

import h5py
import numpy as np
import torch

from hpcattn.config import ShapeConfig
from hpcattn.dtypes import DTYPES
from hpcattn.errors import ConfigError, InputError
from hpcattn.kernels import head_major

CHUNK = 4096


def _chunk_seed(seed: int, name: str, chunk: int) -> int:
    h = hashlib.blake2b(f"{seed}/{name}/{chunk}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 62) - 1)


def synth_tokens(name: str, seed: int, batch: int, heads: int, dim: int, index: torch.Tensor, *,
                 dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Rows ``index`` (global token indices) of synthetic tensor ``name``: (B, len(index), H, d)."""
    index = index.to(torch.long).cpu()
    # stored head-major: a (B, S, H, d) view of a contiguous (B, H, S, d) buffer, which the aten
    # kernels read without a per-call copy (hpcattn.kernels.head_major)
    out = torch.empty(batch, heads, len(index), dim, dtype=dtype, device=device).transpose(1, 2)
    if len(index) == 0:
        return out
    chunks = torch.unique(index // CHUNK).tolist()
    gen = torch.Generator(device=device)
    for c in chunks:
        sel = ((index // CHUNK) == c).nonzero().flatten()
        gen.manual_seed(_chunk_seed(seed, name, c))
        block = torch.randn(batch, CHUNK, heads, dim, generator=gen, device=device, dtype=torch.float32)
        out[:, sel.to(device)] = block[:, (index[sel] - c * CHUNK).to(device)].to(dtype)
    return out


def synth_range(name: str, seed: int, batch: int, heads: int, dim: int, start: int, stop: int, *,
                dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Tokens [start, stop) of synthetic tensor ``name``: (B, stop-start, H, d)."""
    return synth_tokens(name, seed, batch, heads, dim, torch.arange(start, stop), dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------
# HDF5 input files


def _read(ds, sel, dtype: torch.dtype, device) -> torch.Tensor:
    arr = ds[sel]
    if ds.dtype == np.uint16 and ds.attrs.get("dtype_original", "") == "bfloat16":   # (file_shape checked it)
        t = torch.from_numpy(np.ascontiguousarray(arr).view(np.int16)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(np.ascontiguousarray(arr))
    return t.to(device=device, dtype=dtype)


def file_shape(path: str) -> dict:
    """Shapes in an input file: {batch, q_len, heads_q, heads_kv, head_dim, context, lengths}."""
    try:
        f = h5py.File(path, "r")
    except (OSError, FileNotFoundError) as e:
        raise InputError(f"inputs.path: cannot open {path} as HDF5: {e}") from None
    with f:
        for name in ("q", "k", "v"):
            if name not in f:
                raise InputError(f"inputs.path: {path} has no dataset '{name}' "
                                 f"(expected q (B,Sq,Hq,d), k and v (B,N,Hkv,d))")
            ds = f[name]
            if not isinstance(ds, h5py.Dataset):
                raise InputError(f"inputs.path: {path}:/{name} is a {type(ds).__name__.lower()}, "
                                 f"expected a dataset (B,S,H,d)")
            if ds.ndim != 4:
                raise InputError(f"inputs.path: {path}:/{name} has shape {ds.shape}, expected 4 dims")
            if ds.attrs.get("dtype_original", "") == "bfloat16" and ds.dtype != np.uint16:
                raise InputError(f"inputs.path: {path}:/{name} holds {ds.dtype} values but carries attribute "
                                 f"dtype_original=bfloat16, which only uint16 data (bf16 bits) may carry; "
                                 f"delete the attribute, or store the bf16 bits as uint16")
            if not (ds.dtype.kind == "f" and ds.dtype.itemsize in (2, 4, 8) or
                    ds.dtype == np.uint16 and ds.attrs.get("dtype_original", "") == "bfloat16"):
                raise InputError(f"inputs.path: {path}:/{name} holds {ds.dtype} values, expected float16/"
                                 f"float32/float64 (or uint16 bf16 bits with attribute dtype_original=bfloat16)")
            if min(ds.shape) < 1:
                what = "query rows" if name == "q" else "tokens" if ds.shape[1] == 0 else "entries"
                raise InputError(f"inputs.path: {path}:/{name} has shape {ds.shape}: no {what} "
                                 f"(every dimension must be >= 1)")
        q, k, v = f["q"].shape, f["k"].shape, f["v"].shape
        if k != v:
            raise InputError(f"inputs.path: {path}: k {k} and v {v} differ in shape")
        if q[0] != k[0] or q[3] != k[3]:
            raise InputError(f"inputs.path: {path}: q {q} and k {k} disagree in batch or head_dim")
        lengths = None
        if "lengths" in f:
            ln = f["lengths"]
            if not isinstance(ln, h5py.Dataset) or ln.ndim != 1 or ln.dtype.kind not in "iu" or ln.shape[0] != q[0]:
                got = f"shape {ln.shape}, {ln.dtype}" if isinstance(ln, h5py.Dataset) else "a group"
                raise InputError(f"inputs.path: {path}:/lengths is {got}; expected ({q[0]},) integers "
                                 f"(valid KV tokens per sequence)")
            lengths = [int(x) for x in ln[()]]
    return {"batch": q[0], "q_len": q[1], "heads_q": q[2], "heads_kv": k[2], "head_dim": q[3],
            "context": k[1], "lengths": lengths}


def apply_file_shape(cfg, path: str) -> None:
    """Set cfg.shape from the input file; a non-default config value that disagrees is an error."""
    fs = file_shape(path)
    default = ShapeConfig()
    for key in ("batch", "heads_q", "heads_kv", "head_dim", "context", "lengths"):
        mine, theirs = getattr(cfg.shape, key), fs[key]
        if isinstance(mine, list) and key != "lengths":
            raise ConfigError(f"shape.{key}: cannot sweep a shape read from inputs.path ({path})")
        if mine != getattr(default, key) and mine != theirs and not (key == "lengths" and theirs is None):
            raise ConfigError(f"shape.{key}={mine} in the config, but inputs.path {path} has {theirs}")
        if theirs is not None:
            setattr(cfg.shape, key, theirs)
    if cfg.job == "prefill" and fs["q_len"] != fs["context"]:
        raise ConfigError(f"inputs.path {path}: prefill needs q and k of equal length, "
                          f"got q {fs['q_len']} and k {fs['context']} tokens")
    validate_input_file(path, cfg.shape.dtype)            # NaN/Inf, or overflow of shape.dtype: InputError


def validate_input_file(path: str, dtypes, chunk_elems: int = 1 << 24) -> None:
    """Every value a run reads from input file ``path`` - ``q``, ``k``, ``v`` (and ``qq``/``kq``/
    ``vq`` when present), less the keys past a sequence's ``lengths`` (padding, never read) - is
    finite, also once converted to each of ``dtypes`` (names, e.g. ``float16``, which 1e5
    overflows). Raises InputError naming the dataset and the file. Reads the file once, in chunks
    of about ``chunk_elems`` values."""
    names = sorted(set([dtypes] if isinstance(dtypes, str) else dtypes))
    targets = [None] + [DTYPES[d] for d in names if d in DTYPES]     # an unknown name: config.validate
    with h5py.File(path, "r") as f:
        lengths = None
        if "lengths" in f and f["lengths"].shape == f["k"].shape[:1] and f["lengths"].dtype.kind in "iu":
            lengths = torch.as_tensor(f["lengths"][()].astype(np.int64))     # else: every key is checked
        for name in [n for n in ("q", "k", "v", "qq", "kq", "vq") if n in f]:   # qq/kq/vq: star/apb query
            ds = f[name]
            S = ds.shape[1]
            step = max(1, chunk_elems // max(1, ds.size // max(S, 1)))
            bad = {dt: [0, None] for dt in targets}          # dtype -> [count, first index]
            peak = 0.0
            for a in range(0, S, step):
                x = _read(ds, np.s_[:, a:a + step], torch.float64, "cpu")    # (B, s, H, d)
                if name in ("k", "v") and lengths is not None:   # keys past lengths[b]: padding, never read
                    used = torch.arange(a, a + x.shape[1])[None, :] < lengths[:, None]
                    x = torch.where(used[:, :, None, None], x, torch.zeros((), dtype=x.dtype))
                fin = torch.isfinite(x)
                if fin.any():
                    peak = max(peak, float(x[fin].abs().max()))
                for dt in targets:
                    nf = ~torch.isfinite(x if dt is None else x.to(dt))
                    n = int(nf.sum())
                    if n and bad[dt][1] is None:
                        i = nf.nonzero()[0].tolist()
                        bad[dt][1] = (i[0], i[1] + a, *i[2:])
                    bad[dt][0] += n
            for dt in targets:
                n, first = bad[dt]
                if n:
                    what = "NaN/Inf value(s)" if dt is None else \
                        f"value(s) that overflow shape.dtype={str(dt).replace('torch.', '')} (max |x| = {peak:.4g})"
                    raise InputError(f"inputs.path: {path}:/{name} holds {n} {what}, the first at index "
                                     f"{first}; inputs must be finite")


def read_tokens(path: str, name: str, index: torch.Tensor, *, dtype: torch.dtype, device) -> torch.Tensor:
    """Rows ``index`` (sorted global token indices) of dataset ``name``: (B, len(index), H, d)."""
    idx = index.cpu().numpy()
    with h5py.File(path, "r") as f:
        ds = f[name]
        if len(idx) == 0:
            return torch.empty(ds.shape[0], 0, ds.shape[2], ds.shape[3], dtype=dtype, device=device)
        if np.all(np.diff(idx) == 1):
            return _read(ds, np.s_[:, int(idx[0]): int(idx[-1]) + 1], dtype, device)
        return _read(ds, np.s_[:, idx], dtype, device)


def needle_positions(n: int, p: int, count: int) -> torch.Tensor:
    """Where ``count`` needles go: evenly over the middle halves of the blocks of ranks 0..p-2 (far
    from the query at the end; away from block edges and anchors). Same on every rank."""
    if count <= 0:
        return torch.zeros(0, dtype=torch.long)
    lb = n // max(p, 1)
    span = [(r * lb + lb // 4, r * lb + 3 * lb // 4) for r in range(max(p - 1, 1))]
    pos = []
    for i in range(count):
        a, b = span[i % len(span)]
        j = i // len(span)
        per = -(-count // len(span))
        pos.append(a + (b - a) * (j + 1) // (per + 1))
    return torch.tensor(sorted(set(pos)), dtype=torch.long)


def plant_needles(k: torch.Tensor, index: torch.Tensor, positions: torch.Tensor, qq: torch.Tensor,
                  strength: float = 4.0) -> None:
    """In place: the keys at global ``positions`` (those among ``index``, the rows k holds) become
    ``strength`` * sqrt(d) * unit(mean query of the head's group), so the query must find them.

    k: (B, len(index), Hkv, d); qq: (B, ql, Hq, d)."""
    if len(positions) == 0 or len(index) == 0:
        return
    B, ql, Hq, d = qq.shape
    Hkv = k.shape[2]
    qbar = qq.float().view(B, ql, Hkv, Hq // Hkv, d).mean((1, 3))              # (B, Hkv, d)
    direction = qbar / qbar.norm(dim=-1, keepdim=True) * strength * d ** 0.5
    local = torch.isin(index.cpu(), positions).nonzero().flatten().to(k.device)
    if len(local):
        k[:, local] = direction[:, None].to(k.dtype)


def _head_major(t: torch.Tensor) -> torch.Tensor:
    return head_major(t)


class InputSource:
    """Where a job's q/k/v come from: ``tokens(name, index)`` -> (B, len(index), H, d)."""

    def __init__(self, cfg, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.dtype = DTYPES[cfg.shape.dtype]
        s = cfg.shape
        self.heads = {"q": s.heads_q, "k": s.heads_kv, "v": s.heads_kv,      # context
                      "qq": s.heads_q, "kq": s.heads_kv, "vq": s.heads_kv}   # query rows after it

    def tokens(self, name: str, index: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.dtype
        if self.cfg.inputs.source == "file":
            return _head_major(read_tokens(self.cfg.inputs.path, name, index, dtype=dtype, device=self.device))
        s = self.cfg.shape
        return synth_tokens(name, self.cfg.inputs.seed, s.batch, self.heads[name], s.head_dim, index,
                            dtype=dtype, device=self.device)

    def range(self, name: str, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.tokens(name, torch.arange(start, stop), dtype)


def write_input_file(path: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     lengths: list[int] | None = None) -> None:
    """Write q/k/v (and optional lengths) in the input-file layout; bf16 stored as uint16 bits."""
    with h5py.File(path, "w") as f:
        for name, t in (("q", q), ("k", k), ("v", v)):
            t = t.detach().cpu().contiguous()
            if t.dtype == torch.bfloat16:
                ds = f.create_dataset(name, data=t.view(torch.int16).numpy().view(np.uint16))
                ds.attrs["dtype_original"] = "bfloat16"
            else:
                f.create_dataset(name, data=t.numpy())
        if lengths is not None:
            f.create_dataset("lengths", data=np.asarray(lengths, dtype=np.int64))

"""Projection of a P-host prefill from one device: run each virtual host's work, one after the
other, with an emulated communicator that hands the host exactly what it would receive.

For each method and host r this measures the host's compute (its attention calls, and for APB its
scoring and selection) on real data of the right shapes; the step time of a P-host run is then
projected as ``max_r compute_r + comm`` where the communication is modelled from the payload bytes
and a link bandwidth/latency the user measured (``hpcattn check-comm``):

* ring (zigzag): P-1 block transfers of 2 B t Hkv d e bytes; each overlaps the step's compute, so
  only the part a step's transfer exceeds its compute is exposed (computed per step);
* APB: one all-gather of (P, B, lp, Hkv, 2d) per layer, not overlapped:
  ``(P - 1) * bytes_per_rank / bandwidth + latency`` (ring all-gather model);
* Star phase 1 and local: no communication.

The emulated outputs equal the distributed run's (tested), so the work measured is the real work.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from hpcattn import config as config_mod
from hpcattn.comm.base import Counters
from hpcattn.comm.emulated import EmulatedComm
from hpcattn.dtypes import DTYPES
from hpcattn.jobs.inputs import InputSource, needle_positions, plant_needles
from hpcattn.jobs.params import apb_params, attention_level_compressor, star_geometry
from hpcattn.jobs.validate import validate
from hpcattn.kernels import select_kernel
from hpcattn.methods.apb import apb_prefill, local_rows, pool_scores, select_passing
from hpcattn.methods.ring import fill_kv, kv_buffer, ring_prefill
from hpcattn.methods.sharding import zigzag_indices
from hpcattn.methods.star import star_blocks, star_phase1
from hpcattn.results.hdf5 import PROJECTION_KIND
from hpcattn.timing import timed_runs


@dataclass
class _Ctx:
    world: EmulatedComm
    device: torch.device

    @property
    def rank(self):
        return self.world.rank

    @property
    def size(self):
        return self.world.size


def ring_hosts(q, k, v, P: int, *, kernel, scale, device, repeats=3):
    """Per host (zigzag ring, causal): (out, lse, times). q, k, v: (B, n, H, d) full sequence."""
    n = q.shape[1]
    idx = [zigzag_indices(n, P, r).to(q.device) for r in range(P)]
    blocks = []
    for r in range(P):
        b = kv_buffer(k[:, idx[r]], len(idx[r]))
        fill_kv(b, k[:, idx[r]], v[:, idx[r]])
        blocks.append(b)
    res = []
    for r in range(P):
        def run(r=r):
            ctx = _Ctx(EmulatedComm(r, P, Counters(), blocks=blocks), device)
            return ring_prefill(q[:, idx[r]], k[:, idx[r]], v[:, idx[r]], ctx, kernel=kernel, scale=scale,
                                causal=True, layout="zigzag")
        (o, l), ts = timed_runs(run, device, repeats)
        res.append((idx[r], o, l, ts))
    return res


def star_hosts(q, k, v, P: int, *, block: int, anchor: int, kernel, scale, device, repeats=3):
    res = []
    for r, blocks in enumerate(star_blocks(q.shape[1], block, P)):
        (o, l), ts = timed_runs(lambda: star_phase1(q, k, v, blocks=blocks, anchor=anchor, kernel=kernel, scale=scale),
                            device, repeats)
        index = torch.cat([torch.arange(a, b) for a, b in blocks] or [torch.zeros(0, dtype=torch.long)])
        res.append((index, o, l, ts))
    return res


def apb_hosts(q, k, v, qq, kq, vq, P: int, prm, *, compressor, kernel, scale, device, repeats=3):
    """Two passes: every host's selection (to know what the all-gather delivers), then every host's
    whole APB prefill timed with the all-gather answered from pass 1."""
    lb = q.shape[1] // P
    sends = []
    for r in range(P):
        _, *loc = local_rows(q, k, v, qq, kq, vq, r, P, prm)
        send, _ = select_passing(pool_scores(compressor(*loc, r), prm.pool), loc[1], loc[2], prm.lp, prm.la)
        sends.append(send)
    gathered = torch.stack(sends) if prm.lp else None
    res = []
    for r in range(P):
        def run(r=r):
            ctx = _Ctx(EmulatedComm(r, P, Counters(), gathered=gathered), device)
            o, l, _ = apb_prefill(q, k, v, qq, kq, vq, ctx, prm, kernel=kernel, scale=scale, compressor=compressor)
            return o, l
        (o, l), ts = timed_runs(run, device, repeats)
        res.append((torch.arange(r * lb, (r + 1) * lb), o, l, ts))
    return res, (sends[0].numel() * sends[0].element_size() if prm.lp else 0)


def ring_exposed_comm(host_step_compute: float, P: int, block_bytes: int, bw: float, lat: float) -> float:
    """Exposed transfer time of a zigzag ring: each of the P-1 transfers overlaps one step's compute
    (the host's compute spread evenly over its P steps)."""
    step = host_step_compute / P
    xfer = lat + block_bytes / bw
    return (P - 1) * max(0.0, xfer - step)


def allgather_time(P: int, bytes_per_rank: int, bw: float, lat: float) -> float:
    """Ring all-gather model: (P - 1) transfers of one rank's contribution."""
    return lat + (P - 1) * bytes_per_rank / bw if P > 1 and bytes_per_rank else 0.0


PAPER = {"apb_vs_local": 9.2, "apb_vs_ring": 4.2, "apb_vs_star": 1.6}   # APB abstract, 8 hosts


def run_projection(cfg, hosts: int, bw_gbps: float, lat_us: float, output: str | None, log=print) -> list[dict]:
    """``hpcattn project``: every sweep point of a prefill config, each method's P-host work run on
    this one device; returns the rows (and writes an HDF5 record when ``output`` is set)."""
    bw, lat = bw_gbps * 1e9, lat_us * 1e-6
    device = torch.device(config_mod.resolve_device(cfg, torch.cuda.is_available()))
    rows = []
    for point, c in config_mod.expand_cases(cfg):
        validate(c, hosts, device.type == "cuda", source="project")
        s = c.shape
        dtype = DTYPES[s.dtype]
        kernel = select_kernel(c.kernel.backend, device, dtype, s.head_dim)
        scale = s.scale if s.scale is not None else s.head_dim ** -0.5
        src = InputSource(c, device)
        qq, kq, vq = (src.range(x, 0, s.query_len) for x in ("qq", "kq", "vq")) if s.query_len else (None,) * 3
        q, k, v = (src.range(x, 0, s.context) for x in ("q", "k", "v"))
        if c.inputs.needles and qq is not None:
            plant_needles(k, torch.arange(s.context), needle_positions(s.context, hosts, c.inputs.needles), qq)
        e = torch.empty(0, dtype=dtype).element_size()
        reps = c.run.repeats
        results = {}
        if "local" in c.methods:
            _, ts = timed_runs(lambda: kernel(q, k, v, scale=scale, causal="square"), device, reps)
            results["local"] = ("", np.asarray(ts)[:, None], 0.0)
        if "ring" in c.methods:
            hs = ring_hosts(q, k, v, hosts, kernel=kernel, scale=scale, device=device, repeats=reps)
            t = np.asarray([h[3] for h in hs]).T
            block = 2 * s.batch * (s.context // hosts) * s.heads_kv * s.head_dim * e
            comm = ring_exposed_comm(float(np.median(t.max(1))), hosts, block, bw, lat)
            results["ring"] = ("zigzag", t, comm)
        if "star" in c.methods:
            blk, anchor = star_geometry(c, hosts)
            hs = star_hosts(q, k, v, hosts, block=blk, anchor=anchor, kernel=kernel, scale=scale,
                            device=device, repeats=reps)
            results["star"] = (f"block{blk}", np.asarray([h[3] for h in hs]).T, 0.0)
        if "apb" in c.methods:
            prm = apb_params(c, hosts)
            comp, _ = attention_level_compressor(c, qq)
            hs, nbytes = apb_hosts(q, k, v, qq, kq, vq, hosts, prm, compressor=comp, kernel=kernel, scale=scale,
                                   device=device, repeats=reps)
            results["apb"] = (f"la{prm.la}/lp{prm.lp}", np.asarray([h[3] for h in hs]).T,
                              allgather_time(hosts, nbytes, bw, lat))
        base = float(np.median(results["local"][1].max(1))) if "local" in results else None
        for m, (variant, t, comm) in results.items():
            compute = float(np.median(t.max(1)))
            proj = compute + comm
            row = {"method": m, "variant": variant, "hosts": hosts if m != "local" else 1, "context": s.context,
                   "max_host_compute_s": compute, "comm_model_s": comm, "projected_s": proj,
                   "projected_speedup_vs_local": (base / proj) if base else None,
                   "host_times_s": np.median(t, 0).tolist()}
            rows.append(row)
        by = {r["method"]: r["projected_s"] for r in rows if r["context"] == s.context}
        if "apb" in by:
            for other in ("local", "ring", "star"):
                if other in by:
                    rows[-len(results) + list(results).index("apb")][f"apb_vs_{other}"] = by[other] / by["apb"]
    log("attention-level projection (one layer's attention; star/apb: block rows only, the anchor rows' own "
        "attention and every projection/MLP are not charged; for the model level give a generate config)")
    log(f"{'method':6} {'variant':16} {'hosts':>5} {'N':>8} {'max host ms':>12} {'comm ms':>9} "
        f"{'projected ms':>13} {'vs local':>9}")
    for r in rows:
        sp = f"{r['projected_speedup_vs_local']:.2f}x" if r["projected_speedup_vs_local"] else ""
        log(f"{r['method']:6} {r['variant']:16} {r['hosts']:>5} {r['context']:>8} {r['max_host_compute_s'] * 1e3:>12.3f} "
            f"{r['comm_model_s'] * 1e3:>9.3f} {r['projected_s'] * 1e3:>13.3f} {sp:>9}")
    for r in rows:
        if "apb_vs_local" in r or "apb_vs_ring" in r:
            log(f"N={r['context']}: APB projected " + ", ".join(
                f"{r[k]:.2f}x vs {k[7:]} (paper {PAPER[k]}x at 8 hosts)" for k in PAPER if k in r))
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{output}.tmp"                     # written whole, then renamed: never half a file
        with h5py.File(tmp, "w") as f:
            f.attrs["kind"] = PROJECTION_KIND      # how hpcattn report tells it from a run record
            f.attrs["level"] = "attention"
            f.attrs["hosts"] = hosts
            f.attrs["link_gbps"] = bw_gbps
            f.attrs["latency_us"] = lat_us
            f.attrs["device"] = str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
            f.attrs["config_yaml"] = config_mod.to_yaml(cfg)
            f.create_dataset("rows_json", data=json.dumps(rows))
        os.replace(tmp, output)
        log(f"wrote {output}")
    return rows

"""The model-level projection (``hpcattn project`` of a generate config): thread ranks and replay
as communicators, the per-block clock, and the projection's tokens and logits against a real
``mpiexec -n P`` run of the same config."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hpcattn import config as config_mod
from hpcattn.comm.base import Counters
from hpcattn.comm.threaded import Call, CommLog, ReplayComm, run_threads
from hpcattn.jobs.model_projection import PARTS, Link, project_method, summarise, variants
from hpcattn.results.hdf5 import read_cases
from hpcattn.timing import SegmentClock
from tests.mpirun import run_ranks

CONFIG = """
job: generate
model: {preset: tiny, seed: 3}
shape: {batch: 2, context: 132, dtype: float32}
generate: {prefill: [ring, star, apb], decode: tree, new_tokens: 4, query_len: 12}
ring: {layout: zigzag}
apb: {anchor_len: 16, passing_len: 5}
run: {warmup: 0, repeats: 1, check: false, save_outputs: true}
"""


def test_thread_ranks_collectives():
    def body(rank, world):
        c = world.comm(rank)
        g = c.allgather(torch.full((2,), float(rank)))
        b = c.broadcast(torch.tensor([rank * 10.0]), root=2)
        s = c.allreduce(torch.tensor([rank + 1.0]))
        m = c.allreduce(torch.tensor([float(rank)]), op="max")
        recv = torch.empty(3)
        c.sendrecv_start(torch.full((3,), float(rank)), (rank + 1) % 3, recv, (rank - 1) % 3).wait()
        n = c.mpi.allreduce(rank)
        return g, b, s, m, recv, n, c.log

    out = run_threads(3, body)
    for rank, (g, b, s, m, recv, n, log) in enumerate(out):
        assert torch.equal(g, torch.tensor([[0.0, 0], [1, 1], [2, 2]]))
        assert b.item() == 20 and s.item() == 6 and m.item() == 2 and n == 3
        assert torch.equal(recv, torch.full((3,), float((rank - 1) % 3)))
        assert [c.op for c in log.calls] == ["allgather", "broadcast", "allreduce", "allreduce", "sendrecv",
                                             "mpi.allreduce"]
        assert log.calls[0].nbytes == 8 and log.calls[4].peer == (rank - 1) % 3


def test_thread_rank_error_releases_the_others():
    def body(rank, world):
        c = world.comm(rank)
        if rank == 1:
            raise ValueError("rank 1 broke")
        c.allgather(torch.zeros(1))

    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="rank 1 broke"):
        run_threads(3, body)
    assert time.perf_counter() - t0 < 10 and threading.active_count() < 10


def test_replay_answers_in_order_and_refuses_another_call():
    log = CommLog([Call("allgather", 8, "prefill", torch.arange(4.0).view(2, 2)),
                   Call("broadcast", 4, "prefill", torch.tensor([7.0]))])
    rp = ReplayComm(1, 2, log, Counters())
    assert torch.equal(rp.allgather(torch.zeros(2)), torch.arange(4.0).view(2, 2))
    t = torch.zeros(1)
    rp.broadcast(t, root=0)
    assert t.item() == 7 and rp.counters.bytes["other"] == 12
    rp.rewind()
    with pytest.raises(RuntimeError, match="call 0 is broadcast of 4 bytes, the recording has allgather"):
        rp.broadcast(torch.zeros(1), root=0)


def test_segment_clock_tiles_the_span():
    clock = SegmentClock(torch.device("cpu"))
    t0 = time.perf_counter()
    clock.switch("a")
    time.sleep(0.01)
    with clock("b"):
        time.sleep(0.02)
    time.sleep(0.01)
    clock.switch(None)
    span = time.perf_counter() - t0
    parts = clock.collect()
    assert set(parts) == {"a", "b"} and parts["b"] >= 0.02 and parts["a"] >= 0.02
    assert abs(sum(parts.values()) - span) < 2e-3


def test_link_model():
    link = Link(gbps=1.0, latency_us=10.0)
    P = 4
    assert link.cost(Call("allgather", 10**9, "prefill"), P) == pytest.approx(1e-5 + 3.0)
    assert link.cost(Call("broadcast", 10**9, "prefill"), P) == pytest.approx(2e-5 + 1.0)
    assert link.cost(Call("allreduce", 10**9, "prefill"), P) == pytest.approx(4e-5 + 1.5)
    ring = [Call("sendrecv", 10**9, "prefill")] * 3
    assert link.phase_comm(ring, P, overlap_step=0.4) == pytest.approx(3 * (1.0 + 1e-5 - 0.4))
    assert link.phase_comm(ring, P, overlap_step=2.0) == 0.0


def _projections(tmp_path, P):
    path = tmp_path / "g.yaml"
    path.write_text(CONFIG)
    cfg = config_mod.load(str(path), [])
    from hpcattn.jobs.generate import GenerateJob, resolve_shape
    from hpcattn.kernels import select_kernel

    dev = torch.device("cpu")
    out = {}
    for _, c in config_mod.expand_cases(cfg):
        resolve_shape(c)
        for method, variant, vc in variants(c, P):
            if variant == "anchor=la":
                continue
            kernel = select_kernel("auto", dev, torch.float32, c.shape.head_dim)
            job = GenerateJob(vc, SimpleNamespace(device=dev, rank=0, size=1), kernel)
            out[method] = (project_method(job, SimpleNamespace(cfg=vc), P, dev, 4, 1, method, variant,
                                          log=lambda *_: None), job)
    return path, out


@pytest.mark.mpi
@pytest.mark.parametrize("P", [2, 3])
def test_projection_equals_a_real_run(tmp_path, P):
    """The recording pass is the distributed run: the same tokens and logits as mpiexec -n P."""
    path, projs = _projections(tmp_path, P)
    rec = tmp_path / "g.h5"
    r = run_ranks(P, ["-m", "hpcattn", "run", str(path), "-o", str(rec)])
    assert r.returncode == 0, r.stdout + r.stderr
    _, rows = read_cases(str(rec), datasets=("tokens", "logits"))
    assert [row["method"] for row in rows] == ["ring+tree", "star+tree", "apb+tree"]
    for row in rows:
        proj, job = projs[row["method"].split("+")[0]]
        toks, logits = row["datasets"]["tokens"][0], row["datasets"]["logits"][0]
        assert np.array_equal(proj.tokens.numpy(), toks)
        np.testing.assert_allclose(proj.logits.numpy(), logits, rtol=0, atol=1e-5)
        # the breakdown of every host tiles its instrumented prefill, and the summary is consistent
        for h in proj.hosts_timing:
            assert set(h.parts_s) <= set(PARTS) and h.parts_s.get("attention", 0) > 0
            assert sum(h.parts_s.values()) == pytest.approx(h.instrumented_s, rel=0.02, abs=2e-3)
            assert h.model_tokens > 0 and h.attn_flops > 0 and len(h.decode_s) == 3
        s = summarise(proj, Link(25.0, 5.0), job.model.args, 2, 132, 4)
        assert s["prefill_s"] == max(s["host_prefill_s"]) and s["prefill_comm_s"] > 0
        assert s["tok_s"] == pytest.approx(2 * 136 / (s["prefill_s"] + s["decode_s"]))
    assert projs["apb"][0].hosts_timing[-1].parts_s.get("scoring", 0) > 0


def test_project_cli_generate(tmp_path):
    """One command: every method's rows, the tables and a record."""
    import h5py
    import json

    from hpcattn.cli import main

    cfg = tmp_path / "g.yaml"
    cfg.write_text(CONFIG.replace("prefill: [ring, star, apb]", "prefill: [local, ring, star, apb]")
                   .replace("layout: zigzag", "layout: [zigzag, contiguous]"))
    out = tmp_path / "p.h5"
    assert main(["project", str(cfg), "--hosts", "3", "--more-link-gbps", "25", "-o", str(out)]) == 0
    with h5py.File(out) as f:
        assert f.attrs["level"] == "model"
        rows = json.loads(f["rows_json"][()])
    assert [r["link_gbps"] for r in rows] == [150.0] * 6 + [25.0] * 6
    for fast, slow in zip(rows[:6], rows[6:]):        # the same measurements over a slower link
        assert slow["prefill_compute_s"] == fast["prefill_compute_s"] and slow["prefill_s"] >= fast["prefill_s"]
    rows = rows[:6]
    names = [(r["method"], r["variant"]) for r in rows]
    assert names == [("local", "one GPU"), ("ring", "zigzag"), ("ring", "contiguous"), ("star", "anchor=block"),
                     ("star", "anchor=la"), ("apb", "query_aware la16/lp5")]
    for r in rows:
        assert r["prefill_s"] > 0 and r["tok_s"] > 0 and r["hosts"] == (1 if r["method"] == "local" else 3)
        assert r["apb_speedup"] > 0 and set(r["block_ms"]) == set(PARTS)


@pytest.mark.mpi
def test_attention_level_says_what_it_times(tmp_path, capsys):
    """job: prefill with star/apb records and reports that it times the block rows only; the
    attention-level projection says its level."""
    import h5py

    from hpcattn.cli import main
    from hpcattn.results.report import format_table, rows_from_files

    small = ["--set", "shape.heads_q=4", "--set", "shape.heads_kv=2", "--set", "shape.head_dim=16",
             "--set", "context=256", "--set", "shape.query_len=8", "--set", "shape.dtype=float32",
             "--set", "run.repeats=1", "--set", "run.warmup=0", "--set", "inputs.needles=0"]
    rec = tmp_path / "a.h5"
    r = run_ranks(2, ["-m", "hpcattn", "run", "configs/prefill_apb.yaml", *small, "-o", str(rec)])
    assert r.returncode == 0, r.stdout + r.stderr
    rows = rows_from_files([str(rec)])
    work = {r["method"]: r["timed_work"] for r in rows}
    assert work["local"] == work["ring"] == "" and "anchor rows" in work["star"] and "anchor rows" in work["apb"]
    assert "note: apb, star prefill times are attention level" in format_table(rows)
    proj = tmp_path / "p.h5"
    assert main(["project", "configs/prefill_apb.yaml", *small, "--hosts", "2", "-o", str(proj)]) == 0
    assert "attention-level projection" in capsys.readouterr().out
    with h5py.File(proj) as f:
        assert f.attrs["level"] == "attention"

"""The Lamina cost model: its formulas on synthetic measurements, the ``hpcattn lamina-cost``
command, the measurement benchmark's ``--smoke`` run, and the prediction against measured
Lamina and one-process runs on real CPU ranks."""

import json
import os
import subprocess
import sys

import pytest

from hpcattn.model.lamina.cost import (Link, Measurements, max_batch, predict_colocated, predict_lamina,
                                       projection_table)
from tests.mpirun import ROOT, run_ranks


def synthetic(mt=None) -> Measurements:
    """8B-like shape; MTIME 10 ms flat + 0.01 ms per sequence, ATIME 1 us + 1e-9 s per (seq * token)."""
    mt = mt or {1: 0.01001, 256: 0.01256}
    at = [(b, l, 1e-6 + 1e-9 * b * l) for b in (1, 64) for l in (1024, 8192)]
    return Measurements(n_layers=32, dim=4096, n_heads=32, n_kv_heads=8, head_dim=128, elem_bytes=2,
                        weight_bytes=16 * 2 ** 30, mtime=mt, atime=at)


def test_interpolation_and_fit():
    m = synthetic()
    assert m.mtime_at(128) == pytest.approx(0.01 + 128e-5, rel=1e-6)
    assert m.mtime_at(512) == pytest.approx(0.01 + 512e-5, rel=1e-6)      # linear beyond
    assert m.atime_at(32, 4096) == pytest.approx(1e-6 + 1e-9 * 32 * 4096, rel=1e-6)
    assert m.exchange_bytes_per_seq_layer() == (2 + 2 / 4) * 4096 * 2              # 20 KiB (spec 4)
    assert m.kv_bytes_per_seq(8192) == 2 * 32 * 8 * 128 * 2 * 8192


def test_lamina_prediction_bounds():
    m, link = synthetic(), Link(50e9, 20e-6)
    B, l, L = 64, 8192, 32
    one = predict_lamina(m, link, 1, 1, 1, B, l)
    # one micro-batch: nothing overlaps, the step is the chain of model, network and attention
    net = L * (2 * 20e-6 + m.exchange_bytes_per_seq_layer() * B / 50e9)
    assert one["bound"] == "chain"
    assert one["step_s"] == pytest.approx(m.mtime_at(B) + m.atime_at(B, l) + net, rel=1e-9)
    # two micro-batches with a flat MTIME: the model device does twice the (almost) same work
    two = predict_lamina(m, link, 1, 1, 2, B, l)
    assert two["bound"] == "model" and two["step_s"] == pytest.approx(2 * m.mtime_at(B / 2), rel=1e-9)
    # attention-heavy: 4 attention devices cut the attention bound, 2 replicas share the model work
    big = predict_lamina(m, link, 2, 4, 4, 256, 262144)
    small = predict_lamina(m, link, 2, 1, 4, 256, 262144)
    assert small["bound"] == "attention" and big["step_s"] < small["step_s"] / 2
    assert predict_lamina(m, link, 2, 4, 4, 256, 65536, "tensor")["model_s"] == pytest.approx(
        4 * 32 * m.mtime_at(64) / 32 / 2, rel=1e-9)


def test_colocated_and_memory():
    m, link = synthetic(), Link(50e9, 20e-6)
    loc = predict_colocated(m, link, 4, 64, 8192, "local")
    assert loc["step_s"] == pytest.approx(m.mtime_at(16) + m.atime_at(16, 8192), rel=1e-9)
    tree = predict_colocated(m, link, 4, 64, 8192, "tree")
    assert tree["step_s"] == pytest.approx(m.mtime_at(64) + m.atime_at(64, 2048) + 32 * 2 * 20e-6, rel=1e-9)
    gib = 2 ** 30
    caps = max_batch(m, 8192, 80 * gib, 96 * gib, 2, 4)
    kv = m.kv_bytes_per_seq(8192)                                   # 1 GiB per 8K sequence
    assert caps["lamina"] == 4 * 96 * gib // kv == 384
    assert caps["local"] == 6 * ((80 - 16) * gib // kv) and caps["tp"] == (6 * 80 - 16) * gib // kv
    rows = projection_table(m, link, [(2, 4)], [1, 2, 4], [64], 8192, 80 * gib, 96 * gib)
    assert [r["batch"] for r in rows] == [64, "memory max"] and rows[1]["lamina_batch"] == 384
    huge = synthetic()
    huge.weight_bytes = 140 * gib                                    # 70B: no 80 GiB replica holds it
    r = projection_table(huge, link, [(2, 4)], [1, 2], [64], 8192, 80 * gib, 96 * gib)
    assert r[0]["lamina_bound"] == "does not fit" and r[0]["local_tok_s"] == 0.0 and r[0]["tp_tok_s"] > 0
    assert projection_table(huge, link, [(2, 4)], [1, 2], [64], 8192, 80 * gib, 96 * gib, "tensor")[0][
        "lamina_tok_s"] > 0


def test_lamina_cost_cli(tmp_path):
    f = tmp_path / "m.json"
    f.write_text(json.dumps(synthetic().to_json()))
    out = tmp_path / "p.json"
    r = subprocess.run([sys.executable, "-m", "hpcattn", "lamina-cost", str(f), "--dop", "1,1", "--dop", "2,4",
                        "--batch", "16,64", "--mem-gib-model", "80", "--mem-gib-attention", "96", "-o", str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(x["dop"], x["batch"]) for x in rows] == [("(1, 1)", 16), ("(1, 1)", 64), ("(1, 1)", "memory max"),
                                                      ("(2, 4)", 16), ("(2, 4)", 64), ("(2, 4)", "memory max")]
    assert "| (2, 4) | memory max |" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "hpcattn", "lamina-cost", str(f), "--dop", "2x4"],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "--dop '2x4': expected A,B" in bad.stderr
    f.write_text("{}")
    bad = subprocess.run([sys.executable, "-m", "hpcattn", "lamina-cost", str(f)], capture_output=True, text=True,
                         cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "not a Lamina measurements file" in bad.stderr


def test_measure_benchmark_smoke(tmp_path):
    out = tmp_path / "s.json"
    r = subprocess.run([sys.executable, "benchmarks/lamina_measure.py", "--smoke", "-o", str(out)],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       timeout=300)
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    assert [s["name"] for s in d["shapes"]] == ["tiny (8B stand-in)", "tiny-70b-like"]
    for s in d["shapes"]:
        meas = Measurements.from_json(s["measurements"])
        assert len(meas.mtime) == 3 and len(meas.atime) == 6 and all(t > 0 for t in meas.mtime.values())
        dops = {row["dop"] for p in s["projections"] for row in p["rows"]}
        assert dops == {"(1, 1)", "(2, 2)", "(1, 2)", "(2, 4)"}
    assert "### link: paper NCCL 400Gb RoCE" in r.stdout
    assert d["graph_timings"].startswith("skipped: CUDA graphs need a CUDA device") and d["complete"]
    assert "Graph timings: skipped: CUDA graphs need a CUDA device" in r.stdout
    assert d["shapes"][0]["colocated_measured"][0]["eager_ms"] > 0          # the runner's eager step
    r = subprocess.run([sys.executable, "-m", "hpcattn", "lamina-cost", str(out), "--shape", "tiny-70b-like",
                        "--model-split", "tensor", "--batch", "8"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "| (2, 4) | 8 | 8192 |" in r.stdout, r.stdout + r.stderr


FACTOR = 6.0     # real CPU compute on a shared 2-core box is noisy: a sanity bound, predictions within 6x
PACED = (0.8, 1.5)   # paced work (sleeps per sequence, tests/mpi_progs/check_lamina_cost.py): tight
ATTEMPTS = 3     # each must hold in one of 3 runs (a loaded machine slows the cross-process hand-offs)


def _paced_failures(d: dict) -> list[str]:
    m, p, no = d["measured"], d["predicted"], d["no_overlap"]
    bad = [f"paced m={k}: measured {m[k] * 1e3:.1f} ms, predicted {p[k] * 1e3:.1f} ms"
           for k in m if not PACED[0] < m[k] / p[k] < PACED[1]]
    # the overlap is real: 2 and 4 micro-batches beat running them one after the other, and 1
    for k, f in (("2", 0.85), ("4", 0.9)):
        if not m[k] < f * no[k]:
            bad.append(f"paced m={k}: {m[k] * 1e3:.1f} ms, not below {f} x the no-overlap {no[k] * 1e3:.1f} ms")
    if not m["2"] < 0.85 * m["1"]:
        bad.append(f"paced: 2 micro-batches {m['2'] * 1e3:.1f} ms not faster than 1 ({m['1'] * 1e3:.1f} ms)")
    return bad


@pytest.mark.mpi
def test_prediction_against_measured_cpu_runs():
    """Measured MTIME / ATIME / link on 2 CPU ranks -> predicted step times. Real compute: Lamina
    with 1 and 2 micro-batches and one-process decode within FACTOR of the measured runs (minima
    over steps and repeats). Paced work (a sleep per sequence in every model slice and attention
    item, included in the measurements): Lamina with 1, 2, 4 micro-batches within PACED of the
    prediction, and the pipelined runs clearly faster than without overlap. Each set must hold in
    one of ATTEMPTS runs; an overloaded machine makes the comparison meaningless and skips it."""
    load = os.getloadavg()[0]
    if load > 3 * (os.cpu_count() or 1):
        pytest.skip(f"machine overloaded (load {load:.1f} on {os.cpu_count()} cores): timings meaningless")
    fails: dict[str, list[str]] = {"real": [], "paced": []}
    ok = set()
    for _ in range(ATTEMPTS):
        r = run_ranks(2, ["-m", "mpi4py", "tests/mpi_progs/check_lamina_cost.py"], timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        out = {x.split(" ", 1)[0]: json.loads(x.split(" ", 1)[1]) for x in r.stdout.splitlines()
               if x.startswith(("LAMINA_COST ", "LAMINA_PACED "))}
        d = out["LAMINA_COST"]
        real = [f"{k}: measured {d['measured'][k] * 1e3:.2f} ms, predicted {d['predicted'][k] * 1e3:.2f} ms"
                for k in ("lamina_m1", "lamina_m2", "local_1dev")
                if not 1 / FACTOR < d["measured"][k] / d["predicted"][k] < FACTOR]
        for name, bad in (("real", real), ("paced", _paced_failures(out["LAMINA_PACED"]))):
            if bad:
                fails[name].append("; ".join(bad))
            else:
                ok.add(name)
        if ok == {"real", "paced"}:
            return
    pytest.fail("\n".join(f"{k}: off in every attempt:\n  " + "\n  ".join(v) for k, v in fails.items()
                          if k not in ok))


class _Enqueued:
    """A fake NCCL-like context for measure_link: isend / irecv / wait only enqueue (return at
    once), the transfer happens on the 'device' and takes ``delay`` seconds per message, paid at
    ``sync()`` - so a timer that stopped before the sync would see almost nothing."""

    def __init__(self, rank: int, delay: float):
        import torch

        from hpcattn.comm.base import Request

        self.rank, self.device, self.delay, self.pending, self.sent = rank, torch.device("cpu"), delay, 0, []
        outer = self

        class World:
            def isend(self, t, dest, tag):
                outer.pending += 1
                return Request(lambda: None)

            irecv = isend

            def barrier(self):
                pass

            class mpi:                       # noqa: N801 - the control plane: the result goes to the peer
                @staticmethod
                def send(obj, dest, tag):
                    outer.sent.append((obj, dest))

                @staticmethod
                def recv(source, tag):
                    return {"from": source}

        self.world = World()

    def sync(self):
        import time

        time.sleep(self.delay * self.pending)
        self.pending = 0


def test_measure_link_times_the_transfer_not_the_enqueue():
    """measure_link's round trip includes the device-side transfer (the sync after the waits):
    with enqueue-only requests and 2 ms per message on the device, a one-way time of >= 2 ms; the
    lower rank times it and hands the figures to its peer, which returns them."""
    from hpcattn.jobs.lamina_cost import measure_link
    from hpcattn.model.lamina.cost import link_from_pingpong

    ctx = _Enqueued(rank=0, delay=2e-3)
    got = measure_link(ctx, 1, [8, 1 << 20], repeats=3)
    assert set(got) == {8, 1 << 20} and all(2e-3 <= t < 0.05 for t in got.values()), got
    assert ctx.sent == [(got, 1)]
    assert measure_link(_Enqueued(rank=1, delay=0.0), 0, [8], repeats=1) == {"from": 0}
    link = link_from_pingpong({8: 10e-6, 1 << 20: 10e-6 + (1 << 20) / 20e9})
    assert link.latency == 10e-6 and link.bandwidth == pytest.approx(20e9, rel=1e-4)


@pytest.mark.mpi
def test_link_benchmark_on_two_cpu_ranks(tmp_path):
    """benchmarks/lamina_link.py, as jobs/lamina_graphs.sh runs it (there on a GPU), on 2 CPU ranks:
    one-way times for the 8B shape's per-layer message sizes and the fitted link in its JSON."""
    out = tmp_path / "link.json"
    r = run_ranks(2, ["benchmarks/lamina_link.py", "--device", "cpu", "--repeats", "3", "-o", str(out)])
    assert r.returncode == 0, r.stdout + r.stderr
    d = json.loads(out.read_text())
    # 8B: q and out 32 x 128 x 2 B, k and v 2 x 8 x 128 x 2 B per sequence, at B = 1 and 16; 8 B and 4 MiB
    assert sorted(map(int, d["one_way_s"])) == [8, 4096, 8192, 65536, 131072, 1 << 22], d["one_way_s"]
    assert d["transport"] == "mpi_host" and d["latency"] >= 0 and d["bandwidth"] > 0
    assert "link (mpi_host): latency" in r.stdout

"""Lamina (model-attention disaggregated decode): exactness on real ranks against one process, the
generate job's record and report, config errors, and the comm layer's point-to-point calls."""

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from hpcattn import config as C
from hpcattn.errors import ConfigError
from hpcattn.jobs.validate import validate
from hpcattn.model.lamina.cost import Measurements
from hpcattn.results.hdf5 import read_cases
from tests.mpirun import ROOT, run_ranks


@pytest.mark.mpi
@pytest.mark.parametrize("ranks,backend", [(2, "mpi"), (3, "mpi"), (4, "gloo")])
def test_lamina_matches_one_process(ranks, backend):
    """Every valid (attention ranks, micro-batches) split of the ranks, local/ring prefill, uniform
    and ragged prompts, float64 and float32: same greedy tokens and logits as one process, and
    exactly the spec's bytes per phase (tests/mpi_progs/check_lamina.py)."""
    r = run_ranks(ranks, ["-m", "mpi4py", "tests/mpi_progs/check_lamina.py", backend])
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"configurations matched one process on {ranks} ranks" in r.stdout
    # 2 ranks: 1+1 only (4 combos); 3 and 4 ranks: both splits (all 7 combos)
    assert f"check_lamina: {4 if ranks == 2 else 7} configurations" in r.stdout, r.stdout


@pytest.mark.mpi
def test_lamina_generate_job_record_and_report(tmp_path):
    """generate.decode=lamina through the CLI on 3 ranks (2 model + 1 attention), ragged prompts,
    1 and 2 micro-batches: checked tokens, per-role busy/wait per step, bytes per token, report."""
    out = tmp_path / "lam.h5"
    r = run_ranks(3, ["-m", "hpcattn", "run", "configs/generate.yaml", "--set", "generate.decode=lamina",
                      "--set", "lamina.microbatches=[1,2]", "--set", "shape.batch=3", "--set", "context=16",
                      "--set", "shape.lengths=[16,8,12]", "--set", "generate.prefill=local",
                      "--set", "run.repeats=2", "--set", "run.warmup=1", "--set", "run.save_outputs=true",
                      "-o", str(out)])
    assert r.returncode == 0, r.stdout + r.stderr
    meta, rows = read_cases(str(out))
    assert [row["variant"] for row in rows] == ["model2-attn1/mb1", "model2-attn1/mb2"]
    n = 8
    for row in rows:
        assert row["method"] == "local+lamina" and row["check_passed"], row
        assert row["lamina_roles"] == ["model", "model", "attention"] and row["lengths"] == [16, 8, 12]
        # tiny model float32: per token per layer q 256 + kv 128 + out 256 B, residual migration 256 B
        assert row["bytes_per_token"] == 2 * (256 + 128 + 256 + 256)
        assert row["handover_bytes"] == 2 * 2 * 2 * 8 * 4 * (16 + 8 + 12)
        for role in ("model", "attention"):
            assert 0 < row[f"lamina_{role}_util"] <= 1 and 0 <= row[f"lamina_{role}_wait_frac"] <= 1
        assert row["decode_tok_s"] > 0
        assert row["cuda_graphs"] == "eager" and "CPU ranks run eagerly" in row["cuda_graphs_reason"]
        assert row["lamina_model_cuda_graphs"] == row["lamina_attention_cuda_graphs"] == "eager"
        assert "CPU ranks run eagerly" in row["lamina_attention_cuda_graphs_reason"]
    with h5py.File(out) as f:
        case = f["cases"][rows[0]["id"]]
        assert case["lamina_busy_s"].shape == (2, n - 1, 3) and case["lamina_wait_s"].shape == (2, n - 1, 3)
        assert np.isnan(case["lamina_piece_s"][:]).all()          # eager CPU ranks: no captured piece
        send, busy = case["lamina_send_s"][:], case["lamina_busy_s"][:]
        assert (send >= 0).all() and (send <= busy).all() and (send.sum(axis=(0, 1)) > 0).all()   # every rank sends
        assert case["tokens"].shape == (3, n) and case["logits"].shape == (n, 3, 256)
        assert json.loads(case["lamina_bytes"].attrs["phases"]) == ["handover", "q", "kv", "out", "migrate"]
        nbytes = case["lamina_bytes"][:]                      # (ranks, phases): who sent what
        assert nbytes[2, 3] > 0 and nbytes[2, [0, 1, 2, 4]].sum() == 0      # attention rank: outputs only
        assert nbytes[:2, 3].sum() == 0 and nbytes[:2, 0].sum() == rows[0]["handover_bytes"]
    rep = subprocess.run([sys.executable, "-m", "hpcattn", "report", str(out)], capture_output=True, text=True,
                         cwd=ROOT)
    assert rep.returncode == 0 and rep.stdout.count("lamina 2 model + 1 attention ranks") == 2, rep.stdout
    assert rep.stdout.count("steps eager / eager") == 2, rep.stdout
    csv = subprocess.run([sys.executable, "-m", "hpcattn", "report", str(out), "--csv"], capture_output=True,
                         text=True, cwd=ROOT).stdout.splitlines()
    head = csv[0].split(",")
    assert float(csv[1].split(",")[head.index("bytes_per_token")]) == rows[0]["bytes_per_token"]
    assert "lamina_attention_util" in head and "decode_tok_s" in head
    # benchmarks/lamina_graphs_report.py on this record (as the GPU job runs it), against stand-in
    # role times: one row per case and mode, each charged the link of its record's transport
    meas = Measurements(n_layers=rows[0]["n_layers"], dim=64, n_heads=4, n_kv_heads=2, head_dim=16, elem_bytes=4,
                        weight_bytes=10**6, mtime={1: 1e-3, 4: 2e-3},
                        atime=[(b, n, 1e-5 * b * n) for b in (1, 4) for n in (8, 64)], device="cpu", note="stand-in")
    mj, lj, rj = tmp_path / "measure.json", tmp_path / "link.json", tmp_path / "report.json"
    mj.write_text(json.dumps({"shapes": [{"name": n, "measurements": meas.to_json()} for n in ("t", "t (graph)")]}))
    lj.write_text(json.dumps({"transport": meta["transport"], "device": "cpu", "latency": 1e-5, "bandwidth": 1e9}))
    report = [sys.executable, "benchmarks/lamina_graphs_report.py", "--graph", str(out), "--eager", str(out),
              "--measure", str(mj), "--shape", "t", "-o", str(rj)]
    rep = subprocess.run(report + ["--link", str(lj)], capture_output=True, text=True, cwd=ROOT)
    assert rep.returncode == 0, rep.stdout + rep.stderr
    got = json.loads(rj.read_text())["rows"]
    assert sorted((r["mode"], r["microbatches"]) for r in got) == [("eager", 1), ("eager", 2), ("graph", 1), ("graph", 2)]
    for r in got:
        assert r["transport"] == meta["transport"] and r["step_ms"] > 0 and r["predicted_step_ms"] > 0
        assert r["model_busy_ms"] > 0 and np.isnan(r["model_piece_ms"])     # eager CPU ranks: no piece time
        assert 0 < r["attention_send_ms"] <= r["attention_busy_ms"]
    assert f"| 3 | 2 | {meta['transport']} | graph (eager/eager) |" in rep.stdout, rep.stdout
    lj.write_text(json.dumps({"transport": "nccl", "device": "cpu", "latency": 1e-5, "bandwidth": 1e9}))
    rep = subprocess.run(report + ["--link", str(lj)], capture_output=True, text=True, cwd=ROOT)
    assert rep.returncode != 0 and f"transport '{meta['transport']}' has no --link" in rep.stderr, rep.stderr


def _cfg(world, **sets):
    cfg = C.load("configs/generate.yaml", ["generate.decode=lamina", "shape.heads_q=8", "shape.heads_kv=2",
                                           "shape.head_dim=8"] + [f"{k}={v}" for k, v in sets.items()])
    for _, c in C.expand_cases(cfg):
        validate(c, world, cuda_available=False, source="g.yaml")


@pytest.mark.parametrize("world,sets,msg", [
    (4, {"lamina.attention_ranks": 3}, "lamina.attention_ranks=3 must divide the model's KV heads (shape.heads_kv=2)"),
    (2, {"lamina.attention_ranks": 2}, "leaves no model rank: generate.decode=lamina needs at least 3 ranks"),
    (2, {"lamina.microbatches": 2}, "lamina.microbatches=2 must be in [1, shape.batch=1]"),
    (2, {"generate.prefill": "star"}, "generate.prefill must be local or ring"),
    (2, {"lamina.attention_device": "cuda"}, "lamina.attention_device=cuda but no CUDA GPU is visible"),
    (3, {"context": 10}, "ring prefill over the 2 model ranks: prompt length 10 must be >= 2 and divisible by 2 x 2"),
    (2, {"shape.batch": 2, "shape.lengths": "[8,0]"}, "every prompt needs at least one token"),
])
def test_lamina_config_errors(world, sets, msg):
    with pytest.raises(ConfigError) as e:
        _cfg(world, **sets)
    assert msg in str(e.value) and str(e.value).startswith("g.yaml: ")


def test_lamina_mixed_pool_needs_mpi():
    from hpcattn.jobs.lamina import validate_config

    cfg = C.load("configs/generate.yaml", ["generate.decode=lamina", "shape.heads_kv=2", "lamina.model_device=cuda",
                                           "lamina.attention_device=cpu", "comm.backend=gloo"])
    with pytest.raises(ConfigError, match="a mixed pool .* needs comm.backend=mpi"):
        validate_config(cfg, 2, True, "g.yaml")
    cfg.comm.backend = "mpi"
    validate_config(cfg, 2, True, "g.yaml")                # model on a GPU, attention on CPU ranks: fine


def test_lamina_hkv_error_from_the_cli_and_dry_run_plan():
    """One clear line and status 2 (a dry run plans for 4 ranks without launching them); a valid
    plan prints the Lamina case with its memory and bytes per step."""
    bad = subprocess.run([sys.executable, "-m", "hpcattn", "run", "configs/generate.yaml", "--dry-run",
                          "--ranks", "4", "--set", "generate.decode=lamina", "--set", "lamina.attention_ranks=3"],
                         capture_output=True, text=True, cwd=ROOT)
    lines = [x for x in (bad.stdout + bad.stderr).splitlines() if x.strip()]
    assert bad.returncode == 2 and len(lines) == 1, bad.stdout + bad.stderr
    assert lines[0].startswith("hpcattn: error: configs/generate.yaml: lamina.attention_ranks=3 must divide")
    ok = subprocess.run([sys.executable, "-m", "hpcattn", "run", "configs/generate.yaml", "--dry-run", "--ranks", "3",
                         "--set", "generate.decode=lamina", "--set", "lamina.attention_ranks=2"],
                        capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0 and "ring+lamina" in ok.stdout and "model1-attn2/mb1" in ok.stdout, ok.stdout + ok.stderr


def test_layout_heads_rows_and_rotation():
    from hpcattn.model.lamina import Layout

    lay = Layout(world=5, attention_ranks=2, n_heads=32, n_kv_heads=8, batch=7, microbatches=3)
    assert lay.model_ranks == 3 and [lay.role(r) for r in range(5)] == ["model"] * 3 + ["attention"] * 2
    assert lay.kv_heads(1) == (4, 8) and lay.q_heads(1) == (16, 32)
    assert [lay.rows(j) for j in range(3)] == [(0, 2), (2, 4), (4, 7)]
    # slice s of micro-batch j on model rank (j + s) mod M: consecutive slices move to the next rank
    assert [lay.model_rank(1, s) for s in range(4)] == [1, 2, 0, 1]


def test_staged_point_to_point_uses_only_pooled_host_buffers():
    """isend/irecv of 'device' tensors on a non-CUDA-aware MPI (fake device, one rank sending to
    itself): several messages in flight at once each get their own pooled host buffer, the data
    arrives, buffers are reused once released, and bytes are counted by the sender."""
    import torch

    from tests.test_staging import assert_only_host_buffers, make_comm

    comm, spy = make_comm()
    sends = [torch.arange(6, dtype=torch.float64) + 10 * i for i in range(3)]
    recvs = [torch.empty(6, dtype=torch.float64) for _ in range(3)]
    reqs = [comm.irecv(r, 0, 7) for r in recvs] + [comm.isend(s, 0, 7) for s in sends]
    for q in reqs:
        q.wait()
    assert all(torch.equal(r, s) for r, s in zip(recvs, sends))           # in order, per (source, tag)
    assert_only_host_buffers(comm, spy, *sends, *recvs)
    assert len(comm._pool) == 6 and not comm._inflight                   # 3 receive + 3 send slots
    r = torch.empty(6, dtype=torch.float64)
    q = comm.irecv(r, 0, 8)
    comm.isend(sends[2], 0, 8).wait()
    q.wait()
    assert torch.equal(r, sends[2]) and len(comm._pool) == 6              # released slots reused
    assert comm.counters.bytes["other"] == 4 * 6 * 8


@pytest.mark.mpi
def test_lamina_graph_mode_matches_one_process():
    """Lamina's graph mode (each role's pieces between exchanges over static buffers, run eagerly
    on CPU with a stand-in for the capture; tests/mpi_progs/check_lamina_graphs.py) on 3 ranks: 2
    model ranks (rotation, residual migration) + 1 attention rank with ragged prompts and 2
    micro-batches, graph model ranks with eager attention ranks, and 1 model + 2 attention ranks:
    same tokens as one process, each generation of a case replaying the first one's pieces. Over
    MPI with every tensor taken for device data (``mpi-staged``), so that every message of the
    pieces' static buffers is staged through the pinned pool as on a GPU without CUDA-aware MPI."""
    r = run_ranks(3, ["-m", "mpi4py", "tests/mpi_progs/check_lamina_graphs.py", "mpi-staged", "1,2,5"],
                  timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "check_lamina_graphs: 3 configurations matched one process on 3 ranks" in r.stdout, r.stdout

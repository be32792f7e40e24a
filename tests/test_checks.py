"""Checks that can fail: NaN/Inf outputs fail the check (exit 3), NaN/Inf inputs are input errors
(exit 2, naming the dataset and the file), low-precision generate gets a real verdict, ``report``
shows no verdict as "-", the record's status, and names a truncated case file instead of a
traceback."""

import csv
import io
import re
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hpcattn import config
from hpcattn.errors import InputError
from hpcattn.jobs.check import count_nonfinite, max_err, verdict, within
from hpcattn.jobs.inputs import validate_input_file, write_input_file
from hpcattn.kernels import select_kernel
from hpcattn.results.hdf5 import RecordWriter, read_cases, recover
from hpcattn.results.report import format_csv, format_table, rows_from_files
from tests.mpirun import ROOT, run_ranks


def load_cfg(tmp_path, text: str, sets=()):
    p = tmp_path / "c.yaml"
    p.write_text(textwrap.dedent(text))
    return config.load(str(p), list(sets))


class _Mpi:
    """One rank's mpi4py communicator: collectives are the identity."""

    def bcast(self, x, root=0):
        return x

    def gather(self, x, root=0):
        return [x]


def one_rank_ctx():
    world = SimpleNamespace(mpi=_Mpi(), broadcast=lambda t, root=0: None, barrier=lambda: None)
    return SimpleNamespace(size=1, rank=0, device=torch.device("cpu"), world=world, sync=lambda: None,
                           barrier=lambda: None)


def record_of(case, kernel, ctx, errs, extras=None):
    """The case attributes rank 0 writes, through the runner's own _record (check_passed, reason)."""
    from hpcattn.jobs.cases import attention_record as _record
    from hpcattn.timing import PHASES

    per_rank = [(np.ones(1), np.zeros((1, len(PHASES))), [0] * len(PHASES), 0)]
    return _record(case, kernel, ctx, per_rank, [errs], None, None, extras)


# -- the rule -----------------------------------------------------------------------------------

def test_nonfinite_never_passes():
    nan = torch.tensor([1.0, float("nan")])
    ref = torch.tensor([1.0, float("nan")])           # a NaN input: NaN reference and NaN baseline
    e = max_err(nan, ref)
    assert e == float("inf")
    assert not within(e, e)                           # was passes(): inf <= 2 * inf + 1e-5 = True
    v = verdict({"err_out": e, "err_lse": 0.0, "base_err_out": e, "base_err_lse": 0.0})
    assert v["check_passed"] is False and "base_err_out = inf" in v["check_reason"]
    v = verdict({"err_out": e, "err_lse": 0.0, "base_err_out": 1e-3, "base_err_lse": 0.0})
    assert v["check_passed"] is False and "err_out = inf (NaN/Inf" in v["check_reason"]
    assert verdict({"err_out": 1e-3, "err_lse": 0.0, "base_err_out": 1e-3, "base_err_lse": 0.0}) == \
        {"check_passed": True, "check_reason": ""}
    v = verdict({"err_out": 3e-3, "err_lse": None, "base_err_out": 1e-3, "base_err_lse": 0.0})
    assert not v["check_passed"] and "err_out 0.003 > 2 * base_err_out 0.001" in v["check_reason"]
    # approximate methods: the query pass is checked, and NaN/Inf anywhere in the output fails
    row = {"err_out": 5.0, "base_err_out": 0.0, "query_err_out": 1e-6, "query_err_lse": 1e-6,
           "query_base_err_out": 1e-6, "query_base_err_lse": 1e-6, "nonfinite_out": 0}
    assert verdict(row)["check_passed"]
    v = verdict(row | {"nonfinite_out": 3})
    assert not v["check_passed"] and v["check_reason"] == "3 NaN/Inf in the output"
    v = verdict(row | {"query_err_lse": float("inf")})
    assert not v["check_passed"] and "query_err_lse = inf" in v["check_reason"]
    # -inf lse is the empty state (a row without keys), not a failure; NaN or +inf is
    lse = torch.tensor([0.5, float("-inf")])
    assert count_nonfinite(torch.zeros(2), lse) == 0
    assert count_nonfinite(torch.tensor([0.0, float("inf")]), torch.tensor([float("nan"), float("inf")])) == 3


DECODE = """
job: decode
methods: [local, tree]
shape: {batch: 2, heads_q: 4, heads_kv: 2, head_dim: 16, context: 40, dtype: float32}
run: {warmup: 0, repeats: 1}
"""


def test_decode_nan_output_fails_the_record(tmp_path):
    from hpcattn.jobs.decode import DecodeJob
    from hpcattn.jobs.cases import plan_cases

    cfg = load_cfg(tmp_path, DECODE)
    ctx = one_rank_ctx()
    kernel = select_kernel("torch_ref", "cpu", torch.float32, 16)
    case = plan_cases(cfg, 1)[1]
    job = DecodeJob(case.cfg, ctx, kernel)
    ref = job.reference()
    out, lse = kernel(job.q, job.k, job.v, scale=job.scale)
    good = record_of(case, kernel, ctx, job.errors(case, (out, lse), ref))
    assert good["check_passed"] and good["check_reason"] == "" and good["nonfinite_out"] == 0
    out = out.clone()
    out[1, 0, 2, 5] = float("nan")
    bad = record_of(case, kernel, ctx, job.errors(case, (out, lse), ref))
    assert bad["check_passed"] is False and bad["nonfinite_out"] == 1
    assert bad["check_reason"].startswith("1 NaN/Inf in the output; err_out = inf"), bad["check_reason"]


PREFILL = """
job: prefill
methods: [local, ring, star]
shape: {batch: 1, heads_q: 4, heads_kv: 2, head_dim: 16, context: 64, query_len: 4, dtype: float32, causal: true}
run: {warmup: 0, repeats: 1, check_rows: 8}
"""


def test_prefill_nan_in_an_unchecked_row_fails(tmp_path):
    """Only run.check_rows rows are compared with the reference; a NaN in any other row fails too."""
    from hpcattn.jobs.prefill import PrefillJob
    from hpcattn.jobs.cases import plan_cases

    cfg = load_cfg(tmp_path, PREFILL)
    ctx = one_rank_ctx()
    kernel = select_kernel("torch_ref", "cpu", torch.float32, 16)
    cases = {c.method: c for c in plan_cases(cfg, 1)}
    job = PrefillJob(cfg, ctx, kernel)
    ref = job.reference()
    assert 1 not in job.rows.tolist()
    out, lse = kernel(job.q, job.k, job.v, scale=job.scale, causal="square")
    assert record_of(cases["ring"], kernel, ctx, job.errors(cases["ring"], (out, lse), ref))["check_passed"]
    out = out.clone()
    out[0, 1, 0, 0] = float("inf")                        # row 1: not a checked row
    rec = record_of(cases["ring"], kernel, ctx, job.errors(cases["ring"], (out, lse), ref))
    assert rec["err_out"] < 1e-5 and rec["check_passed"] is False and rec["nonfinite_out"] == 1
    # Star: the verdict is the exact query pass's, and still fails on NaN/Inf in its context rows
    query = {"query_err_out": 0.0, "query_err_lse": 0.0, "query_base_err_out": 0.0, "query_base_err_lse": 0.0}
    rec = record_of(cases["star"], kernel, ctx, job.errors(cases["star"], (out, lse), ref), query)
    assert rec["check_passed"] is False and rec["check_reason"] == "1 NaN/Inf in the output"
    lse = lse.clone()
    lse[0, 0, 1] = float("nan")
    out[0, 1, 0, 0] = 0.0
    rec = record_of(cases["star"], kernel, ctx, job.errors(cases["star"], (out, lse), ref), query)
    assert rec["check_passed"] is False and rec["nonfinite_out"] == 1


# -- non-finite inputs ----------------------------------------------------------------------------

def qkv(B=2, N=12, Sq=1, scale_v=1.0):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, Sq, 4, 8, generator=g), torch.randn(B, N, 2, 8, generator=g),
            torch.randn(B, N, 2, 8, generator=g) * scale_v)


def test_input_file_must_be_finite(tmp_path):
    q, k, v = qkv()
    path = str(tmp_path / "a.h5")
    write_input_file(path, q, k, v)
    validate_input_file(path, "float32")
    k[1, 7, 0, 3] = float("nan")
    write_input_file(path, q, k, v)
    with pytest.raises(InputError, match=r"a\.h5:/k holds 1 NaN/Inf value\(s\), the first at index \(1, 7, 0, 3\)"):
        validate_input_file(path, "float32", chunk_elems=64)        # several chunks: index is global
    # keys past a sequence's length are never read: padding may hold anything
    write_input_file(path, q, k, v, lengths=[12, 7])
    validate_input_file(path, "float32")
    q[0, 0, 1, 1] = float("-inf")
    write_input_file(path, q.to(torch.bfloat16), k, v, lengths=[12, 7])   # bf16 stored as uint16 bits
    with pytest.raises(InputError, match=r":/q holds 1 NaN/Inf"):
        validate_input_file(path, "bfloat16")
    # finite in the file, but not in the run's dtype
    q, k, v = qkv(scale_v=1e5)
    write_input_file(path, q, k, v)
    validate_input_file(path, ["float32", "bfloat16"])
    with pytest.raises(InputError, match=r":/v holds \d+ value\(s\) that overflow shape.dtype=float16"):
        validate_input_file(path, ["float32", "float16"])


def test_checkpoint_weight_must_be_finite(tmp_path):
    from safetensors.torch import load_file, save_file

    from hpcattn.jobs.generate import build_checked_model
    from hpcattn.model.llama import ModelArgs
    from hpcattn.model.weights import random_model, save_checkpoint

    ckpt = tmp_path / "ckpt"
    save_checkpoint(random_model(ModelArgs.from_preset("tiny"), 1, torch.float32, "cpu"), ckpt)
    cfg = load_cfg(tmp_path, f"job: generate\nmodel: {{path: {ckpt}}}\n")
    build_checked_model(cfg, torch.float32, "cpu")
    st = load_file(str(ckpt / "model.safetensors"))
    st["model.layers.1.self_attn.k_proj.weight"][3, 2] = float("nan")
    save_file(st, str(ckpt / "model.safetensors"))
    with pytest.raises(InputError, match=r"ckpt: tensor model\.layers\.1\.self_attn\.k_proj\.weight "
                                         r"\(as float32\) holds 1 NaN/Inf value\(s\) \(first at index \(3, 2\)\)"):
        build_checked_model(cfg, torch.float32, "cpu")


# -- the generate verdict -----------------------------------------------------------------------------

GENERATE = """
job: generate
model: {preset: tiny, seed: 0}
shape: {batch: 2, context: 24, dtype: bfloat16}
generate: {prefill: local, decode: local, new_tokens: 6}
run: {warmup: 0, repeats: 1}
"""


def generate_job(tmp_path, sets=()):
    from hpcattn.jobs.generate import GenerateJob, resolve_shape
    from hpcattn.jobs.cases import plan_cases

    cfg = load_cfg(tmp_path, GENERATE, sets)
    resolve_shape(cfg)
    case = plan_cases(cfg, 1)[0]
    kernel = select_kernel("torch_ref", "cpu", torch.bfloat16, cfg.shape.head_dim)
    job = GenerateJob(case.cfg, one_rank_ctx(), kernel)
    job.compute_reference(case)
    return job


def test_low_precision_generate_gets_a_verdict(tmp_path):
    job = generate_job(tmp_path)
    toks, logits = job.reference                          # what an exact method produces
    c = job.check(toks, logits)
    assert c["check_passed"] is True and c["check_reason"] == "", c        # was None for bfloat16
    assert c["reference_dtype"] == "float64" and c["token_agreement"] == 1.0
    assert 0 < c["logits_base_err"] == c["logits_max_err"] < 0.1            # bf16 vs float64: real error
    assert c["tokens_decided"] > 0 and c["tokens_mismatched"] == 0
    tol = 2 * c["logits_base_err"] + 1e-5
    worse = logits.clone()
    worse[2, 1, 7] += 3 * tol                             # beyond the same-dtype baseline's tolerance
    c = job.check(toks, worse)
    assert c["check_passed"] is False and c["check_reason"].startswith("logits_max_err"), c
    nan = logits.clone()
    nan[0, 0, 0] = float("nan")
    c = job.check(toks, nan)
    assert c["check_passed"] is False and "logits_max_err = inf" in c["check_reason"]
    # a token that is not the reference's argmax where the margin leaves no doubt
    ref = job._reference_logits(toks, logits)[0]
    top2 = ref.double().topk(2, dim=-1)
    t, b = divmod(int((top2.values[..., 0] - top2.values[..., 1]).argmax()), ref.shape[1])
    wrong = toks.clone()
    wrong[b, t] = top2.indices[t, b, 1]
    c = job.check(wrong, logits)
    assert c["check_passed"] is False and "decided token(s) differ" in c["check_reason"], c


def test_prompt_logits_are_checked_at_every_position(tmp_path):
    """generate.prompt_logits: the gathered logits of every prompt position get the same rule
    against a one-process reference (float64) and baseline (the case's dtype)."""
    job = generate_job(tmp_path, ["generate.prompt_logits=true", "run.save_outputs=true"])
    toks, logits = job.reference
    exact = job.one_process_prompt_logits(job.model, job.kernel)        # (B, N, V): an exact method's
    assert exact.shape == (2, 24, job.model.args.vocab_size)
    job.prompt_logits = exact
    c = job.check(toks, logits)
    assert c["check_passed"] is True and 0 < c["prompt_logits_base_err"] == c["prompt_logits_max_err"], c
    worse = exact.clone()
    worse[1, 3, 5] += 3 * (2 * c["prompt_logits_base_err"] + 1e-5)   # one early prompt position off
    job.prompt_logits = worse
    c = job.check(toks, logits)
    assert c["check_passed"] is False and "prompt_logits_max_err" in c["check_reason"], c


def test_approximate_generate_has_no_verdict(tmp_path):
    job = generate_job(tmp_path, ["generate.prefill=star", "generate.decode=tree", "generate.query_len=4"])
    c = job.check(*job.reference)
    assert c["check_passed"] is None and c["logits_max_err"] >= 0 and c["token_agreement"] == 1.0


# -- report: "-" for no verdict, status, truncated files ----------------------------------------------

HOSTS = [{"rank": 0, "local_rank": 0, "node": 0, "hostname": "n0", "device": "cpu"}]


def case_attrs(i, passed):
    return {"method": "tree", "variant": "", "job": "generate" if passed is None else "decode", "batch": 1,
            "heads_q": 4, "heads_kv": 2, "head_dim": 8, "context": 16, "dtype": "bfloat16", "world_size": 1,
            "group": i, "time_median_s": 1e-3, "time_p10_s": 1e-3, "time_p90_s": 1e-3, "comm_fraction": 0.0,
            "throughput_tok_s": 10.0, "err_out": 0.0, "check_passed": passed,
            "check_reason": "" if passed is not False else "err_out 1 > 2 * base_err_out 0 + 1e-05"}


def writer(path):
    return RecordWriter(str(path), {"world_size": 1}, "job: decode\n", HOSTS, {})


def test_report_verdicts_and_status(tmp_path):
    w = writer(tmp_path / "done.h5")
    for i, passed in enumerate((True, False, None)):
        w.write_case(f"c{i}", case_attrs(i, passed), {"time_s": (np.ones((1, 1)), {})})
    w.close()
    w = writer(tmp_path / "live.h5")                      # a running (or killed) run: NAME.tmp
    w.write_case("c0", case_attrs(0, True), {"time_s": (np.ones((1, 1)), {})})
    w = writer(tmp_path / "killed.h5")
    w.write_case("c0", case_attrs(0, True), {"time_s": (np.ones((1, 1)), {})})
    recover(str(tmp_path / "killed.h5.tmp"))
    rows = rows_from_files([str(tmp_path / n) for n in ("done.h5", "live.h5.tmp", "killed.h5")])
    lines = format_table(rows).splitlines()
    head = lines[0].split()
    got = [dict(zip(head[-2:], line.split()[-2:])) for line in lines[1:]]
    assert got == [{"check": "ok", "status": "complete"}, {"check": "FAIL", "status": "complete"},
                   {"check": "-", "status": "complete"}, {"check": "ok", "status": "running"},
                   {"check": "ok", "status": "incomplete"}], lines
    table = list(csv.DictReader(io.StringIO(format_csv(rows))))
    assert [(r["check"], r["check_passed"], r["status"]) for r in table] == [
        ("ok", "True", "complete"), ("FAIL", "False", "complete"), ("-", "", "complete"),
        ("ok", "True", "running"), ("ok", "True", "incomplete")]
    assert table[1]["check_reason"].startswith("err_out 1 >")


def report(*args):
    return subprocess.run([sys.executable, "-m", "hpcattn", "report", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_report_truncated_files(tmp_path):
    w = writer(tmp_path / "r.h5")
    for i in range(3):
        w.write_case(f"c{i}", case_attrs(i, True), {"time_s": (np.ones((1, 1)), {}),
                                                    "out": (np.ones((2, 3000), np.float32), {})})
    parts = sorted((tmp_path / "r.h5.tmp.d").glob("*.h5"))
    bad = parts[1]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])          # truncated on disk
    # a NAME.tmp with one bad case file: the others are reported, the bad one named in a warning
    r = report(str(tmp_path / "r.h5.tmp"), "--csv")
    assert r.returncode == 0, r.stderr
    assert [x["id"] for x in csv.DictReader(io.StringIO(r.stdout))] == ["c0", "c2"]
    warn = r.stderr.strip().splitlines()
    assert len(warn) == 1 and warn[0].startswith(f"hpcattn: warning: {bad}: unreadable case file") \
        and warn[0].endswith("skipped"), r.stderr
    meta, rows = read_cases(str(tmp_path / "r.h5.tmp"), warn=False)
    assert meta["unreadable_case_files"] == [str(bad)] and len(rows) == 2
    # recover merges the good cases and keeps the bad file for inspection
    out = recover(str(tmp_path / "r.h5.tmp"))
    meta, rows = read_cases(str(out))
    assert meta["status"] == "incomplete" and [r["id"] for r in rows] == ["c0", "c2"]
    kept = tmp_path / "r.h5.unmerged" / bad.name                    # the bad file, kept for inspection
    assert kept.is_file() and not (tmp_path / "r.h5.tmp.d").exists() and not (tmp_path / "r.h5.tmp").exists()
    # a whole record truncated, and a record whose bytes are damaged: one error naming the file, exit 2
    data = out.read_bytes()
    out.write_bytes(data[: len(data) * 2 // 3])
    r = report(str(out))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"hpcattn: error: {out}: "), r.stderr
    assert "Traceback" not in r.stderr
    for seed in range(40):                                 # damaged bytes inside: never a traceback
        rng = np.random.default_rng(seed)
        b = bytearray(data)
        at = int(rng.integers(0, 6000))
        b[at:at + 48] = rng.integers(0, 256, 48, dtype=np.uint8).tobytes()
        out.write_bytes(bytes(b))
        try:
            read_cases(str(out))
        except InputError as e:
            assert str(out) in str(e)


def test_report_skips_a_projection_file_and_refuses_other_files(tmp_path, capfd):
    """`hpcattn report runs/*.h5` where runs/ also holds a `hpcattn project -o` file: the records are
    reported, the projection file is skipped with one warning line naming it; an HDF5 file that is
    neither is one error line naming it (exit 2)."""
    import h5py

    from hpcattn import cli
    from hpcattn.jobs.projection import run_projection

    w = writer(tmp_path / "a.h5")
    w.write_case("c0", case_attrs(0, True), {"time_s": (np.ones((1, 1)), {})})
    w.close()
    proj = tmp_path / "p.h5"
    cfg = load_cfg(tmp_path, """
        job: prefill
        methods: [local, ring]
        shape: {batch: 1, heads_q: 2, heads_kv: 1, head_dim: 8, context: 32, dtype: float32}
        run: {warmup: 0, repeats: 1}
        """)
    run_projection(cfg, 2, 100.0, 10.0, str(proj), log=lambda *a: None)
    capfd.readouterr()
    assert cli.main(["report", "--csv", str(tmp_path / "a.h5"), str(proj)]) == 0
    out, err = capfd.readouterr()
    assert [r["id"] for r in csv.DictReader(io.StringIO(out))] == ["c0"]
    assert err.splitlines() == [f"hpcattn: warning: {proj}: a projection file (hpcattn project -o, 2 hosts), "
                                f"not a run record; skipped (its rows are the JSON in /rows_json: docs/hdf5.md)"]
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.zeros(3)
    assert cli.main(["report", str(proj), str(tmp_path / "other.h5")]) == 2
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"hpcattn: warning: {proj}: a projection file"), lines
    assert lines[1] == f"hpcattn: error: {tmp_path / 'other.h5'}: not an hpcattn record (no /cases group)"


# -- the CLI: exit 2 for a NaN input, exit 3 for a NaN output (one launch each) ---------------------------

def nan_input_file(path, **kw):
    q, k, v = qkv(B=1, N=32, Sq=kw.pop("Sq", 1))
    k[0, 9, 1, 4] = float("nan")
    write_input_file(str(path), q, k, v)


def one_error(r, *parts, only=""):
    """Exit 2 and one line (``only``: one line containing it) holding every part."""
    lines = [l for l in (r.stdout + r.stderr).splitlines() if l.strip() and only in l]
    assert r.returncode == 2 and len(lines) == 1 and all(p in lines[0] for p in parts), r.stdout + r.stderr


@pytest.mark.mpi
@pytest.mark.parametrize("job,ranks", [("decode", 4), ("prefill", 1)])     # the same on 1 and 4 ranks
def test_cli_nan_input_file(tmp_path, job, ranks):
    inp = tmp_path / "nan.h5"
    nan_input_file(inp, Sq=32 if job == "prefill" else 1)
    methods = "[local, tree, ring]" if job == "decode" else "[local, ring, star, apb]"
    cfg = tmp_path / "c.yaml"
    shape = "{dtype: float32, query_len: 4}" if job == "prefill" else "{dtype: float32}"
    cfg.write_text(f"job: {job}\nmethods: {methods}\nshape: {shape}\n"
                   f"inputs: {{source: file, path: {inp}}}\nrun: {{warmup: 0, repeats: 1}}\n")
    out = tmp_path / "o.h5"
    r = run_ranks(ranks, ["-m", "hpcattn", "run", str(cfg), "-o", str(out)], timeout=120)
    one_error(r, "hpcattn: error: inputs.path:", f"{inp}:/k holds 1 NaN/Inf value(s)", "(0, 9, 1, 4)")
    assert not out.exists() and not (tmp_path / "o.h5.tmp").exists()


@pytest.mark.mpi
def test_cli_nan_checkpoint_weight(tmp_path):
    from safetensors.torch import load_file, save_file

    from hpcattn.model.llama import ModelArgs
    from hpcattn.model.weights import random_model, save_checkpoint

    ckpt = tmp_path / "ckpt"
    save_checkpoint(random_model(ModelArgs.from_preset("tiny"), 1, torch.float32, "cpu"), ckpt)
    st = load_file(str(ckpt / "model.safetensors"))
    st["model.norm.weight"][5] = float("inf")
    save_file(st, str(ckpt / "model.safetensors"))
    out = tmp_path / "g.h5"
    r = run_ranks(2, ["-m", "hpcattn", "run", "configs/generate.yaml", "--set", f"model.path={ckpt}",
                      "-o", str(out)], timeout=120)
    # the model is loaded after the set-up line, as for a checkpoint missing a tensor
    one_error(r, f"model.path: {ckpt}: tensor model.norm.weight (as float32) holds 1 NaN/Inf", only="error")
    assert not out.exists() and not (tmp_path / "g.h5.tmp").exists()


@pytest.mark.mpi
def test_cli_nan_output_exits_3(tmp_path):
    """Finite inputs whose scores overflow float32 (scale 1e38): every method and the same-dtype
    baseline give NaN, the float64 reference does not. Exit 3, every case FAIL with its reason."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("job: prefill\nmethods: [local, ring, star, apb]\n"
                   "shape: {batch: 1, heads_q: 4, heads_kv: 2, head_dim: 16, context: 64, query_len: 4, "
                   "dtype: float32, causal: true, scale: 1.0e+38}\nrun: {warmup: 0, repeats: 1, check_rows: 16}\n")
    out = tmp_path / "o.h5"
    r = run_ranks(2, ["-m", "hpcattn", "run", str(cfg), "-o", str(out)], timeout=180)
    assert r.returncode == 3, r.stdout + r.stderr
    meta, rows = read_cases(str(out))
    assert [x["method"] for x in rows] == ["local", "ring", "star", "apb"]
    for x in rows:
        assert x["check_passed"] is False and "NaN/Inf in the output" in x["check_reason"], x
    assert r.stdout.count("check FAIL: ") == 4
    assert re.search(r"hpcattn: check FAILED for c0000-local-causal \(\d+ NaN/Inf in the output; ", r.stdout), r.stdout
    rep = report(str(out))
    assert rep.returncode == 0 and rep.stdout.count(" FAIL ") == 4, rep.stdout

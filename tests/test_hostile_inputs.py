"""Issue 28's hostile-but-fair inputs: a run never writes over a file it reads (or another run's work
files), never waits silently before the watchdog, refuses huge sweeps early, and says one line for
misused inputs, directories given as records, a full disk and paths that are not UTF-8."""

from __future__ import annotations

import hashlib
import textwrap
import time

import pytest

from tests.mpirun import run_ranks
from tests.test_bad_inputs import DECODE, inputs_file, one_error_line, run_inprocess, write


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# -- -o never names a file the run reads, nor another record's work file ------------------------------

def _collisions(tmp_path):
    cfg = write(tmp_path, "d.yaml", "# my comments\n" + DECODE)
    inp = inputs_file(tmp_path / "in.h5")
    fcfg = write(tmp_path, "f.yaml", f"job: decode\nmethods: [local]\ninputs: {{source: file, path: {inp}}}\n"
                                     "run: {warmup: 0, repeats: 1}\n")
    ids = tmp_path / "ids.txt"
    ids.write_text("1 2 3 4 5 6 7 8\n")
    gcfg = write(tmp_path, "g.yaml", f"job: generate\ngenerate: {{prompt_ids: {ids}, new_tokens: 1}}\n")
    model = tmp_path / "ckpt"
    model.mkdir()
    (model / "config.json").write_text("{}")
    mcfg = write(tmp_path, "m.yaml", f"job: generate\nmodel: {{path: {model}}}\n")
    return {  # name: (argv, the file that must survive, what the line must say)
        "config file": (["run", cfg, "-o", cfg], cfg, [f"output {cfg} is the config file {cfg}"]),
        "inputs.path": (["run", fcfg, "-o", inp], inp, [f"output {inp} is inputs.path {inp}"]),
        "prompt_ids": (["run", gcfg, "-o", str(ids)], str(ids), [f"is generate.prompt_ids {ids}"]),
        "model.path file": (["run", mcfg, "-o", str(model / "config.json")], str(model / "config.json"),
                            [f"is a file of model.path {model}"]),
    }


@pytest.mark.parametrize("name", ["config file", "inputs.path", "prompt_ids", "model.path file"])
def test_output_naming_a_file_the_run_reads_is_refused(tmp_path, capfd, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    argv, keep, expect = _collisions(tmp_path)[name]
    before = _digest(keep)
    code, out, err = run_inprocess(capfd, argv)
    line = one_error_line(err)
    assert code == 2 and all(x in line for x in expect), line
    assert _digest(keep) == before and not list(tmp_path.glob("**/*.tmp*"))


@pytest.mark.parametrize("suffix", [".tmp", ".tmp.d", ".tmp.lock", ".lock", ".merging", ".unmerged"])
def test_output_named_like_a_work_file_is_refused(tmp_path, capfd, monkeypatch, suffix):
    monkeypatch.chdir(tmp_path)
    cfg = write(tmp_path, "d.yaml", DECODE)
    out = tmp_path / f"x.h5{suffix}"
    code, _, err = run_inprocess(capfd, ["run", cfg, "-o", str(out)])
    line = one_error_line(err)
    assert code == 2 and f"output {out}: a name ending in" in line and f"writing {tmp_path / 'x.h5'} " in line, line
    assert sorted(x.name for x in tmp_path.iterdir()) == ["d.yaml"]


@pytest.mark.mpi
def test_4_ranks_output_naming_the_config_is_refused(tmp_path):
    cfg = write(tmp_path, "d.yaml", "# my comments\n" + DECODE)
    before = _digest(cfg)
    r = run_ranks(4, ["-m", "hpcattn", "run", cfg, "-o", cfg], timeout=90)
    line = one_error_line(r.stderr)
    assert r.returncode == 2 and f"output {cfg} is the config file {cfg}" in line, r.stderr
    assert _digest(cfg) == before and sorted(x.name for x in tmp_path.iterdir()) == ["d.yaml"]


# -- the watchdog covers the first collective ----------------------------------------------------------

HANG_READING = textwrap.dedent("""
    import sys, time
    import hpcattn.jobs.inputs as inputs
    def stuck(cfg, path):          # rank 0 stuck on a hung file system while it reads inputs.path
        time.sleep(600)
    inputs.apply_file_shape = stuck
    from hpcattn.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [1, 4])
def test_rank_0_stuck_reading_an_input_ends_every_rank_with_exit_4(tmp_path, ranks):
    """Ranks 1..N-1 wait in the config broadcast while rank 0 reads; the watchdog, armed before
    that first collective with $HPCATTN_SETUP_TIMEOUT_S, ends every rank with the exit-4 line."""
    path = inputs_file(tmp_path / "in.h5")
    cfg = write(tmp_path, "f.yaml", f"job: decode\nmethods: [local]\ninputs: {{source: file, path: {path}}}\n")
    start = time.time()
    r = run_ranks(ranks, ["-c", HANG_READING, "run", cfg, "-o", str(tmp_path / "x.h5")], timeout=120,
                  env={"HPCATTN_SETUP_TIMEOUT_S": "3", "HPCATTN_ABORT_GRACE_S": "0.5"})
    assert r.returncode == 4, (r.returncode, r.stderr)
    lines = [x for x in r.stderr.splitlines() if x.startswith("hpcattn: error")]
    assert lines and all("resolving the config on rank 0" in x and "HPCATTN_SETUP_TIMEOUT_S = 3 s" in x
                         for x in lines), r.stderr
    assert time.time() - start < 60 and not list(tmp_path.glob("x.h5*"))


def test_bad_setup_timeout_is_one_line(tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HPCATTN_SETUP_TIMEOUT_S", "soon")
    code, _, err = run_inprocess(capfd, ["run", write(tmp_path, "d.yaml", DECODE), "-o", "x.h5"])
    assert code == 2 and "HPCATTN_SETUP_TIMEOUT_S='soon': expected a number of seconds > 0" in one_error_line(err)


# -- huge sweeps: the count first, a limit before planning ---------------------------------------------

HUGE = "job: decode\nmethods: [local, tree]\nshape: {batch: %s, context: %s, heads_q: 2, heads_kv: 1, head_dim: 8}\n" % (
    list(range(1, 101)), list(range(1, 201)))


def test_huge_sweep_is_refused_before_planning(tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    start = time.time()
    code, out, err = run_inprocess(capfd, ["run", write(tmp_path, "h.yaml", HUGE), "-o", "x.h5"])
    line = one_error_line(err)
    assert code == 2 and "the sweep has 40000 cases (20000 points: shape.batch (100) x shape.context (200); " \
                         "x 2 method(s)), more than run.max_cases = 10000" in line and "run.max_cases=40000" in line
    assert time.time() - start < 5 and not list(tmp_path.glob("x.h5*"))


def test_big_sweep_says_its_case_count_before_planning(tmp_path, capfd, monkeypatch):
    """The count comes out before planning starts (here: the limit then refuses it, so nothing is
    planned; a sweep under the limit goes on to plan after the same line)."""
    monkeypatch.chdir(tmp_path)
    cfg = write(tmp_path, "b.yaml", "job: decode\nmethods: [local]\nshape: {batch: [1, 2, 3], context: %s}\n"
                % list(range(1, 401)))
    code, out, err = run_inprocess(capfd, ["run", cfg, "--dry-run", "--set", "run.max_cases=1000"])
    assert code == 2 and "more than run.max_cases = 1000" in one_error_line(err)
    assert out.splitlines() == ["hpcattn: planning 1200 cases (1200 points: shape.batch (3) x shape.context "
                                "(400); x 1 method(s))"]


@pytest.mark.mpi
def test_4_ranks_huge_sweep_is_one_line(tmp_path):
    r = run_ranks(4, ["-m", "hpcattn", "run", write(tmp_path, "h.yaml", HUGE), "-o", str(tmp_path / "x.h5")],
                  timeout=90)
    line = one_error_line(r.stderr)
    assert r.returncode == 2 and "more than run.max_cases = 10000" in line and not list(tmp_path.glob("x.h5*"))


# -- dtype_original only on uint16 -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["f4", "f2", "f8"])
def test_dtype_original_on_float_data_is_one_line(tmp_path, capfd, monkeypatch, dtype):
    """A float dataset carrying dtype_original=bfloat16 was reinterpreted as bf16 bits (false
    NaN errors, tracebacks, or a check at twice the head_dim)."""
    import h5py
    import numpy as np

    monkeypatch.chdir(tmp_path)
    path = inputs_file(tmp_path / "in.h5")
    with h5py.File(path, "a") as f:
        del f["k"]
        f["k"] = np.ones((1, 8, 2, 16), dtype)
        f["k"].attrs["dtype_original"] = "bfloat16"
    cfg = write(tmp_path, "f.yaml", f"job: decode\nmethods: [local]\ninputs: {{source: file, path: {path}}}\n"
                                    "run: {warmup: 0, repeats: 1}\n")
    code, _, err = run_inprocess(capfd, ["run", cfg, "-o", "x.h5"])
    line = one_error_line(err)
    assert code == 2 and f"{path}:/k holds {np.dtype(dtype).name} values but carries attribute " \
                         "dtype_original=bfloat16" in line, line
    assert not list(tmp_path.glob("x.h5*"))


# -- report / compare / plot: one line for a directory ------------------------------------------------

@pytest.mark.parametrize("argv", [["report", "runs"], ["compare", "runs", "runs"], ["plot", "runs", "-o", "p.png"]])
def test_a_directory_given_as_a_record_is_one_line(tmp_path, capfd, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    code, out, err = run_inprocess(capfd, argv)
    assert code == 2 and one_error_line(err) == "hpcattn: error: runs: is a directory; give record files " \
                                                "(e.g. runs/*.h5)", err
    assert not (tmp_path / "p.png").exists()


# -- a disk that fills during a case ------------------------------------------------------------------

DISK_FULL = textwrap.dedent("""
    import errno, sys
    import h5py
    import hpcattn.results.hdf5 as hdf5

    class FullDisk:                       # h5py, except that the third case file hits a full disk
        def __getattr__(self, name):
            return getattr(h5py, name)

        @staticmethod
        def File(name, *args, **kw):
            f = h5py.File(name, *args, **kw)
            if str(name).endswith(".partial") and "/00002-" in str(name):
                f.close()
                raise OSError(errno.ENOSPC, "Unable to synchronously write (No space left on device)")
            return f
    hdf5.h5py = FullDisk()
    from hpcattn.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [1, 4])
def test_disk_full_during_a_case_is_one_line_and_keeps_finished_cases(tmp_path, ranks):
    from hpcattn.results.hdf5 import read_cases

    cfg = write(tmp_path, "d.yaml", DECODE)
    out = tmp_path / "x.h5"
    r = run_ranks(ranks, ["-c", DISK_FULL, "run", cfg, "-o", str(out)], timeout=120)
    ours = [x for x in r.stderr.splitlines() if x.startswith("hpcattn")]
    assert r.returncode == 2 and len(ours) == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr)
    assert f"output {out}: the file system at /" in ours[0] and "is full (no space left) while writing case " \
           "c0002" in ours[0] and "bytes free; the 2 finished case(s) are kept: free space, then hpcattn " \
           f"recover {out}.tmp" in ours[0], ours[0]
    assert len(read_cases(f"{out}.tmp")[1]) == 2 and not list(tmp_path.glob("x.h5.tmp.d/*.partial"))


def test_disk_full_at_the_merge_is_one_message_and_recover_still_works(tmp_path, monkeypatch):
    import errno

    import numpy as np

    import hpcattn.results.hdf5 as hdf5
    from hpcattn.errors import InputError

    w = hdf5.RecordWriter(str(tmp_path / "r.h5"), {"world_size": 1}, "job: decode", [{"rank": 0}], {})
    w.write_case("c000", {"method": "local"}, {"time_s": (np.ones((2, 1)), {})})

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(hdf5.shutil, "copyfile", full)
    with pytest.raises(InputError, match=r"is full \(no space left\) while writing the merge into .*r\.h5: it "
                                         r"needs about \d+ bytes, \d+ bytes free; the 1 finished case"):
        w.close()
    monkeypatch.undo()
    assert not (tmp_path / "r.h5.merging").exists()
    hdf5.recover(str(w.tmp))
    assert len(hdf5.read_cases(str(tmp_path / "r.h5"))[1]) == 1


# -- paths that are not UTF-8 --------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["-o", "inputs.path"])
def test_a_path_that_is_not_utf8_is_one_line_naming_the_cause(tmp_path, capfd, monkeypatch, key):
    monkeypatch.chdir(tmp_path)
    bad = str(tmp_path / "r\udcff.h5")              # the byte 0xff, as Python keeps it from argv
    cfg = write(tmp_path, "d.yaml", DECODE)
    if key == "inputs.path":
        inputs_file(bad)
        argv = ["run", cfg, "--set", "inputs.source=file", "--set", f"inputs.path={bad}", "-o", "x.h5"]
    else:
        argv = ["run", cfg, "-o", bad]
    code, _, err = run_inprocess(capfd, argv)
    line = one_error_line(err)
    assert code == 2 and f"{'output' if key == '-o' else key} {tmp_path}/r\\xff.h5: the path is not valid UTF-8 " \
                         "(byte \\xff at position" in line, line
    assert not list(tmp_path.glob("x.h5*"))


def test_a_config_whose_name_is_not_utf8_runs_and_the_record_shows_the_byte(tmp_path, capfd, monkeypatch):
    """(Its name went into the record's argv attribute: 'unexpected UnicodeEncodeError'.)"""
    import sys

    from hpcattn.results.hdf5 import read_cases

    monkeypatch.chdir(tmp_path)
    cfg = write(tmp_path, "d\udcfe.yaml", DECODE)
    argv = ["run", cfg, "--set", "methods=[local]", "--set", "shape.context=64", "-o", "x.h5"]
    monkeypatch.setattr(sys, "argv", ["hpcattn", *argv])       # as Python decodes the byte 0xfe
    code, out, err = run_inprocess(capfd, argv)
    assert code == 0, err
    assert "d\\xfe.yaml" in read_cases(str(tmp_path / "x.h5"))[0]["argv"]


# -- ranks that wait while one rank works alone sleep ---------------------------------------------------

IDLE = textwrap.dedent("""
    import time
    from mpi4py import MPI
    from hpcattn import comm as comm_mod
    from hpcattn.jobs.measure import time_case

    ctx = comm_mod.setup(MPI.COMM_WORLD, device_kind="cpu")

    def alone(tm):                 # the local baseline: rank 0 computes 0.4 CPU-s, the others nothing
        end = time.process_time() + 0.4
        while ctx.rank == 0 and time.process_time() < end:
            pass
    ctx.barrier()
    c0 = time.process_time()
    time_case(alone, ctx, warmup=0, repeats=3, solo=True)
    ctx.idle_barrier()
    cpu = MPI.COMM_WORLD.gather(time.process_time() - c0)
    if ctx.rank == 0:
        print("idle cpu", max(cpu[1:]), cpu[0])
""")


@pytest.mark.mpi
def test_4_ranks_waiting_for_a_solo_baseline_sleep():
    """While rank 0 times the single-rank baseline (1.2 s of work here), ranks 1..3 sleep in a polled
    MPI_Ibarrier instead of busy-polling in MPI_Barrier (which took rank 0's cores: local at 16K
    went from 48.9 ms alone to 131 ms in a 4-rank run on 2 cores)."""
    r = run_ranks(4, ["-c", IDLE], timeout=120)
    assert r.returncode == 0, r.stderr
    idle, busy = map(float, r.stdout.split("idle cpu")[1].split())
    assert idle < 0.25 * busy, f"an idle rank used {idle:.2f} s of CPU while rank 0 used {busy:.2f} s"


def test_project_and_recover_outputs_never_name_what_they_read(tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = write(tmp_path, "p.yaml", "job: prefill\nmethods: [local, ring]\n")
    before = _digest(cfg)
    code, _, err = run_inprocess(capfd, ["project", cfg, "--hosts", "2", "-o", cfg])
    assert code == 2 and f"output {cfg} is the config file {cfg}" in one_error_line(err) and _digest(cfg) == before
    (tmp_path / "r.h5.tmp").write_text("x")
    code, _, err = run_inprocess(capfd, ["recover", "r.h5.tmp", "-o", "r.h5.tmp"])
    assert code == 2 and "output r.h5.tmp: a name ending in .tmp" in one_error_line(err)
    assert (tmp_path / "r.h5.tmp").read_text() == "x"

"""Bad input of every kind: one ``hpcattn: error:`` line from rank 0, exit 2 on every rank, no hang,
no traceback, no record; Ctrl-C; the record lock (a second run to the same -o never deletes the
first one's finished cases). One rank runs in-process (``cli.main``), four ranks under mpiexec for
a representative subset (one launch per input)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest
import torch

from hpcattn import cli, collective, watchdog
from hpcattn.results.hdf5 import RecordWriter, lock_path, read_cases, recover
from tests.mpirun import ROOT, mpiexec, run_ranks

DECODE = """
job: decode
methods: [local, tree]
shape: {batch: 1, heads_q: 4, heads_kv: 2, head_dim: 16, context: [64, 128], dtype: float32}
run: {warmup: 0, repeats: 1}
"""


def write(tmp_path, name, text):
    p = tmp_path / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(textwrap.dedent(text))
    return str(p)


def inputs_file(path, q=None, lengths=None, q_group=False):
    """An input file with k, v (1, 8, 2, 16) float32 and the given q / lengths."""
    with h5py.File(path, "w") as f:
        if q_group:
            f.create_group("q")
        else:
            f["q"] = np.zeros((1, 1, 4, 16), "f4") if q is None else q
        f["k"] = np.zeros((1, 8, 2, 16), "f4")
        f["v"] = np.zeros((1, 8, 2, 16), "f4")
        if lengths is not None:
            f["lengths"] = lengths
    return str(path)


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("hpcattn: error: "), err
    assert "Traceback" not in err
    return lines[0]


def run_inprocess(capfd, argv):
    """``hpcattn ARGV`` on one rank in this process: (exit status, stdout, stderr)."""
    code = cli.main(argv)
    out, err = capfd.readouterr()
    return code, out, err


# -- one rank, in-process: every input of the list ----------------------------------------------------

def _cases(tmp_path):
    d = write(tmp_path, "d.yaml", DECODE)
    f = write(tmp_path, "f.yaml", "job: decode\nmethods: [local]\nshape: {dtype: float32}\n"
                                  "run: {warmup: 0, repeats: 1}\n")
    (tmp_path / "isdir.h5").mkdir()
    (tmp_path / "afile").write_text("x")
    (tmp_path / "cfgdir").mkdir()
    fileset = ["--set", "inputs.source=file", "--set"]
    return {
        "non-utf8 yaml": (["run", write(tmp_path, "n.yaml", b"job: decode\n# \xff\xfe\n"), "--dry-run"],
                          ["n.yaml", "not UTF-8"]),
        "duplicate key": (["run", write(tmp_path, "dup.yaml", "job: decode\nshape:\n  context: 8\n  context: 9\n"),
                           "--dry-run"], ["dup.yaml", "duplicate key 'context'", "line 4"]),
        "config is a directory": (["run", str(tmp_path / "cfgdir"), "--dry-run"], ["cfgdir", "is a directory"]),
        "methods=[]": (["run", d, "--set", "methods=[]", "-o", str(tmp_path / "x.h5")],
                       ["methods must list at least one method"]),
        "check_rows=-1": (["run", d, "--set", "run.check_rows=-1", "--dry-run"], ["run.check_rows must be >= 1"]),
        "--ranks -1": (["run", d, "--dry-run", "--ranks", "-1"], ["--ranks -1", ">= 1"]),
        "/q is a group": (["run", f, *fileset, "inputs.path=" + inputs_file(tmp_path / "g.h5", q_group=True)],
                          ["g.h5:/q is a group"]),
        "2-D /lengths": (["run", f, *fileset, "inputs.path=" + inputs_file(tmp_path / "l.h5",
                                                                          lengths=np.zeros((1, 1), "i8"))],
                         ["l.h5:/lengths", "expected (1,) integers"]),
        "q as strings": (["run", f, *fileset, "inputs.path=" + inputs_file(tmp_path / "s.h5",
                                                                          q=np.full((1, 1, 4, 16), b"a"))],
                         ["s.h5:/q holds |S1"]),
        "0 query rows": (["run", f, *fileset, "inputs.path=" + inputs_file(tmp_path / "z.h5",
                                                                          q=np.zeros((1, 0, 4, 16), "f4"))],
                         ["z.h5:/q", "no query rows"]),
        "-o existing directory": (["run", d, "-o", str(tmp_path / "isdir.h5")], ["isdir.h5 is an existing directory"]),
        "-o parent is a file": (["run", d, "-o", str(tmp_path / "afile" / "x.h5")], ["afile is a file"]),
        "-o read-only fs": (["run", d, "-o", "/proc/x.h5"], ["cannot write in /proc"]),
    }


CASES = ["non-utf8 yaml", "duplicate key", "config is a directory", "methods=[]", "check_rows=-1", "--ranks -1",
         "/q is a group", "2-D /lengths", "q as strings", "0 query rows", "-o existing directory",
         "-o parent is a file", "-o read-only fs"]


@pytest.mark.parametrize("name", CASES)
def test_bad_input_one_line_exit_2(tmp_path, capfd, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    argv, expect = _cases(tmp_path)[name]
    code, out, err = run_inprocess(capfd, argv)
    line = one_error_line(err)
    assert code == 2, (code, err)
    for text in expect:
        assert text in line, line
    assert not list(tmp_path.glob("*.h5.tmp*")) and not (tmp_path / "x.h5").exists()


BAD_VALUES = [  # (--set arguments, the key the one error line must name)
    (["run.check_rows=0"], "run.check_rows must be >= 1"), (["shape.batch=0"], "shape.batch must be >= 1"),
    (["shape.context=0"], "shape.context must be >= 1"), (["run.repeats=0"], "run.repeats must be >= 1"),
    (["run.warmup=-1"], "run.warmup must be >= 0"), (["run.case_timeout_s=-5"], "run.case_timeout_s must be > 0"),
    (["shape.heads_q=3", "shape.heads_kv=2"], "shape.heads_q (3) must be a multiple of shape.heads_kv (2)"),
]


@pytest.mark.parametrize("config", ["demo_decode", "demo_prefill"])
@pytest.mark.parametrize("sets,expect", BAD_VALUES, ids=[" ".join(s) for s, _ in BAD_VALUES])
def test_bad_value_is_one_line_naming_the_key(tmp_path, capfd, monkeypatch, config, sets, expect):
    """The shipped demo configs with one bad value each (1 rank): one error line naming the key and
    the value, exit 2, nothing written."""
    monkeypatch.chdir(tmp_path)
    path = str(ROOT / "configs" / f"{config}.yaml")
    code, out, err = run_inprocess(capfd, ["run", path, *[a for s in sets for a in ("--set", s)],
                                           "-o", str(tmp_path / "x.h5")])
    line = one_error_line(err)
    assert code == 2 and line.startswith(f"hpcattn: error: {path}: {expect}"), line
    assert not list(tmp_path.iterdir())


def test_output_into_missing_folders_creates_them(tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = write(tmp_path, "d.yaml", DECODE)
    out = tmp_path / "new" / "sub" / "x.h5"
    code, _, err = run_inprocess(capfd, ["run", cfg, "--set", "methods=[local]", "--set", "shape.context=64",
                                         "-o", str(out)])
    assert code == 0 and read_cases(str(out))[0]["status"] == "complete", err
    assert sorted(x.name for x in out.parent.iterdir()) == ["x.h5"]      # no lock, probe or .tmp left


def test_unexpected_exception_names_the_input_and_debug_shows_traceback(tmp_path, capfd, monkeypatch):
    """Any exception while resolving (not only HpcattnError) is one line naming the input and the
    exception; --debug adds the traceback."""
    import hpcattn.jobs.inputs as inputs

    def broken(cfg, path):
        raise KeyError("no such thing")
    monkeypatch.setattr(inputs, "apply_file_shape", broken)
    path = inputs_file(tmp_path / "in.h5")
    cfg = write(tmp_path, "f.yaml", "job: decode\nmethods: [local]\ninputs: {source: file, path: %s}\n" % path)
    code, out, err = run_inprocess(capfd, ["run", cfg, "--dry-run"])
    line = one_error_line(err)
    assert code == 2 and f"inputs.path {path}: unexpected KeyError: 'no such thing'" in line, line
    code, out, err = run_inprocess(capfd, ["run", cfg, "--dry-run", "--debug"])
    assert code == 2 and "Traceback" in err and "in broken" in err and err.rstrip().splitlines()[-1].startswith(
        "hpcattn: error: inputs.path"), err


def test_malformed_model_config_json_is_one_line(tmp_path, capfd):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": ')
    cfg = write(tmp_path, "g.yaml", f"job: generate\nmodel: {{path: {ckpt}}}\nshape: {{context: 16}}\n")
    code, out, err = run_inprocess(capfd, ["run", cfg, "--dry-run"])
    line = one_error_line(err)
    assert code == 2 and str(ckpt) in line, line


class _FakeWorld:
    """allgather of ranks where rank ``bad`` raised (the others see its message)."""

    def __init__(self, messages):
        self.messages = messages

    def allgather(self, mine):
        return [mine, *self.messages]


def test_collective_check_turns_any_exception_into_one_message():
    with pytest.raises(collective.Collective, match=r"kernel self-tests: unexpected ZeroDivisionError"):
        collective.collective_check(_FakeWorld([None]), lambda: 1 / 0, "kernel self-tests")
    with pytest.raises(collective.Collective, match="rank 1 says no"):        # another rank's error, here too
        collective.collective_check(_FakeWorld(["rank 1 says no"]), lambda: 7)
    assert collective.collective_check(_FakeWorld([None]), lambda: 7) == 7


def test_case_too_big_for_memory_is_refused_before_allocating(tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = write(tmp_path, "d.yaml", DECODE)
    big = ["--set", "shape.context=100000000000", "--set", "methods=[local]"]
    code, out, err = run_inprocess(capfd, ["run", cfg, *big, "-o", str(tmp_path / "big.h5")])
    line = one_error_line(err)
    assert code == 2 and "needs about 2" in line and "TiB per rank" in line and "run.memory_check=false" in line
    assert not list(tmp_path.glob("big.h5*"))
    # the override: past the check (then the dry-run plan, which allocates nothing, shows the size)
    code, out, err = run_inprocess(capfd, ["run", cfg, *big, "--set", "run.memory_check=false", "--dry-run"])
    assert code == 0 and "23.3 TiB" in out, err


PREFILL = """
job: prefill
methods: [ring]
shape: {batch: 1, heads_q: 4, heads_kv: 2, head_dim: 16, context: 256, dtype: float32}
run: {warmup: 0, repeats: 1, check_rows: 16}
"""


@pytest.mark.parametrize("job", ["decode", "prefill", "generate"])
def test_memory_check_counts_rank_0s_reference_copy(tmp_path, capfd, monkeypatch, job):
    """A case whose own tensors fit but not with the copy rank 0 holds for run.check (the whole KV
    or q/k/v; for generate a float64 copy of the model) is refused; the dry-run shows that share."""
    from hpcattn import config
    from hpcattn.jobs import cases as runner

    monkeypatch.chdir(tmp_path)
    text = {"decode": DECODE.replace("[local, tree]", "[tree]").replace("[64, 128]", "4096"),
            "prefill": PREFILL, "generate": (ROOT / "configs" / "generate.yaml").read_text()}[job]
    cfg_path = write(tmp_path, f"{job}.yaml", text)
    sets = ["--set", "generate.decode=tree"] if job == "generate" else []
    cases = runner.plan_cases(config.load(cfg_path, [s for s in sets if s != "--set"]), 1)
    case = cases[0]
    need, _, rank0 = runner.JOBS[job][1](case.cfg, case.method, 1)
    case.cfg.run.check = False
    bare, _, rank0_bare = runner.JOBS[job][1](case.cfg, case.method, 1)
    assert rank0_bare == 0 and rank0 > 0 and need == bare + rank0, (need, bare, rank0)
    if job == "generate":                       # float32 on CPU: the float64 copy of the weights alone
        from hpcattn.jobs.generate import model_args, weight_bytes
        assert rank0 > weight_bytes(model_args(case.cfg), 8)
    monkeypatch.setattr(runner, "_host_available", lambda: (need + bare) // 2)
    code, out, err = run_inprocess(capfd, ["run", cfg_path, *sets, "-o", str(tmp_path / "m.h5")])
    line = one_error_line(err)
    assert code == 2 and f"case {case.id} needs about {runner.format_bytes(need)} per rank" in line, line
    assert not list(tmp_path.glob("m.h5*"))
    runner.check_memory([case], 1, torch.device("cpu"), 1)         # run.check off: it fits
    code, out, err = run_inprocess(capfd, ["run", cfg_path, *sets, "--dry-run"])
    row = next(x for x in out.splitlines() if x.startswith(case.id))
    assert code == 0 and f"{runner.format_bytes(need)} {runner.format_bytes(rank0):>11}" in row, row


def test_memory_check_shares_a_gpu_among_its_ranks(monkeypatch):
    """Ranks that share one GPU (several ranks per device, as on a one-GPU test machine) each get
    their share of its free memory, and the refusal says so."""
    from hpcattn.jobs import cases as runner

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3000, 8000))
    dev = torch.device("cuda", 0)
    assert runner.available_memory(dev, 4, 1) == (3000, "free on cuda:0")
    assert runner.available_memory(dev, 4, 3) == (1000, "free on cuda:0 / 3 ranks sharing it")


def test_watchdog_report_is_one_write_ending_in_newline(monkeypatch):
    """Launchers forward each rank's writes as they come: the hang line and the stacks go out in one
    write(2) that ends with a newline, so reports of different ranks cannot run together."""
    writes = []
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: writes.append((fd, data)) or len(data)
                        if fd == 2 else real_write(fd, data))

    class Aborted(Exception):
        pass

    def abort(world, code):
        raise Aborted(code)
    monkeypatch.setattr(watchdog, "abort_job", abort)
    with pytest.raises(Aborted):
        watchdog._fire("case c0002-local", 4.0, 3)
    assert len(writes) == 1, writes
    text = writes[0][1].decode()
    assert text.startswith("hpcattn: error (rank 3): case c0002-local ran longer than run.case_timeout_s = 4 s")
    assert "most recent call first" in text and "test_watchdog_report_is_one_write" in text
    assert text.endswith("\n")


class _AbortingWorld:
    """COMM_WORLD of ``size`` ranks whose ``Abort`` raises (as if the launcher had ended the job)."""

    def __init__(self, size):
        self.size = size

    def Get_size(self):
        return self.size

    def Abort(self, code):
        raise _Ended(("MPI_Abort", code))


class _Ended(Exception):
    pass


@pytest.mark.parametrize("size", [4, 1])
def test_ctrl_c_leaves_130_in_the_abort_file(tmp_path, capfd, monkeypatch, size):
    """Ctrl-C ends the job through the one abort path: under the Slurm templates (srun reports 137
    for any MPI_Abort) the code 130 is in $HPCATTN_ABORT_FILE for slurm/job_env.sh's run_ranks; a
    1-rank world exits 130 itself (no launcher to tell, no file needed)."""
    abort_file = tmp_path / "abort"
    monkeypatch.setenv("HPCATTN_ABORT_FILE", str(abort_file))
    monkeypatch.setenv("HPCATTN_ABORT_GRACE_S", "0")
    monkeypatch.setattr(watchdog, "_world_from_thread", lambda: _AbortingWorld(size))
    monkeypatch.setattr(os, "_exit", lambda code: (_ for _ in ()).throw(_Ended(("_exit", code))))
    monkeypatch.setitem(watchdog._interrupt, "note", lambda: "nothing was written")
    rfd, wfd = os.pipe()
    os.write(wfd, bytes([signal.SIGINT]))           # what signal.set_wakeup_fd writes on SIGINT
    try:
        with pytest.raises(_Ended) as ended:
            watchdog._on_interrupt(rfd, 0)
    finally:
        os.close(rfd)
        os.close(wfd)
    assert capfd.readouterr().err == "hpcattn: interrupted; nothing was written\n"
    if size > 1:
        assert ended.value.args[0] == ("MPI_Abort", 130) and abort_file.read_text() == "130\n"
    else:
        assert ended.value.args[0] == ("_exit", 130) and not abort_file.exists()


# -- the record lock -------------------------------------------------------------------------------

def _writer(path):
    return RecordWriter(str(path), {"world_size": 1}, "job: decode", [{"rank": 0}], {})


def test_lock_refuses_a_second_writer_and_is_released_at_close(tmp_path):
    path = tmp_path / "r.h5"
    w = _writer(path)
    w.write_case("c000", {"method": "local"}, {"time_s": (np.ones((2, 1)), {})})
    owner = json.loads(lock_path(w.tmp).read_text())
    assert owner["host"] == socket.gethostname() and owner["pid"] == os.getpid() and owner["started_utc"]
    with pytest.raises(Exception, match=r"being written by another run \(pid %d" % os.getpid()):
        _writer(path)
    assert [r["id"] for r in read_cases(str(w.tmp))[1]] == ["c000"]      # the first run's case survives
    w.close()
    assert not lock_path(w.tmp).exists()
    _writer(path).close()                                                 # free again


def test_stale_lock_message_names_recover_and_recover_releases_it(tmp_path):
    path = tmp_path / "s.h5"
    w = _writer(path)
    w.write_case("c000", {"method": "local"}, {"time_s": (np.ones((2, 1)), {})})
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    info = {"host": socket.gethostname(), "pid": int(dead.stdout), "started_utc": "2026-01-01T00:00:00Z"}
    lock_path(w.tmp).write_text(json.dumps(info))                         # as if that process had died
    with pytest.raises(Exception, match=r"a run that died \(pid %d .*`hpcattn recover %s` merges its 1 finished"
                       % (info["pid"], str(w.tmp).replace(".", r"\."))):
        _writer(path)
    lock_path(w.tmp).write_text(json.dumps(dict(info, host="elsewhere")))
    with pytest.raises(Exception, match=r"locked by pid .* on elsewhere.*cannot tell whether.*hpcattn recover"):
        _writer(path)
    recover(str(w.tmp))
    assert not lock_path(w.tmp).exists() and read_cases(str(path))[0]["status"] == "incomplete"


# -- four ranks (and one): the representative subset under mpiexec ------------------------------------

INJECT = textwrap.dedent("""
    import sys
    import hpcattn.jobs.inputs as inputs
    def broken(cfg, path):
        raise KeyError("injected on rank 0")
    inputs.apply_file_shape = broken
    from hpcattn.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.mpi
def test_4_ranks_unexpected_exception_on_rank_0_is_one_line_not_a_hang(tmp_path):
    path = inputs_file(tmp_path / "in.h5")
    cfg = write(tmp_path, "f.yaml", "job: decode\nmethods: [local]\ninputs: {source: file, path: %s}\n" % path)
    start = time.time()
    r = run_ranks(4, ["-c", INJECT, "run", cfg, "-o", str(tmp_path / "x.h5")], timeout=90)
    line = one_error_line(r.stderr)
    assert r.returncode == 2 and "unexpected KeyError: 'injected on rank 0'" in line and path in line, r.stderr
    assert time.time() - start < 80 and not list(tmp_path.glob("x.h5*"))


@pytest.mark.mpi
def test_4_ranks_case_too_big_is_one_line(tmp_path):
    cfg = write(tmp_path, "d.yaml", DECODE)
    r = run_ranks(4, ["-m", "hpcattn", "run", cfg, "--set", "shape.context=100000000000", "-o",
                      str(tmp_path / "big.h5")], timeout=90)
    line = one_error_line(r.stderr)
    assert r.returncode == 2 and "per rank (the --dry-run estimate)" in line and "/ 4 ranks on this host" in line
    assert not list(tmp_path.glob("big.h5*"))


def _launch(n, args, env):
    e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **env)
    cmd = (mpiexec() + ["-n", str(n)] if n else []) + [sys.executable, "-m", "hpcattn", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=e,
                            start_new_session=True)        # its own process group, as a terminal's job


def _wait_for_cases(tmp, n, proc, timeout=90):
    parts = tmp.with_name(tmp.name + ".d")
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if parts.is_dir() and len(list(parts.glob("*.h5"))) >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"{n} finished cases did not appear (rc {proc.poll()})")


@pytest.mark.mpi
def test_4_ranks_second_run_refused_ctrl_c_one_line_finished_cases_survive(tmp_path, capfd):
    """A 4-rank run holds the lock (it hangs on its third case, by the test hook); a second run to the
    same -o is refused naming the owner and deletes nothing; Ctrl-C ends the first with one line and
    130; a third run is told to recover the stale record, and recover keeps both finished cases."""
    cfg = write(tmp_path, "d.yaml", DECODE)
    out = tmp_path / "r.h5"
    tmp = tmp_path / "r.h5.tmp"
    first = _launch(4, ["run", cfg, "-o", str(out)], {"HPCATTN_TEST_HANG_RANK": "1"})
    try:
        _wait_for_cases(tmp, 2, first)
        owner = json.loads(lock_path(tmp).read_text())
        code, _, err = run_inprocess(capfd, ["run", cfg, "-o", str(out)])     # the second run
        line = one_error_line(err)
        assert code == 2 and f"being written by another run (pid {owner['pid']}" in line, line
        assert len(read_cases(str(tmp))[1]) == 2                          # nothing of the first run lost
        os.killpg(first.pid, signal.SIGINT)                               # Ctrl-C in the terminal
        stdout, stderr = first.communicate(timeout=30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    capfd.readouterr()
    assert first.returncode == 130, (first.returncode, stderr)
    ours = [x for x in stderr.splitlines() if x.startswith("hpcattn")]
    assert ours == [f"hpcattn: interrupted; finished cases are kept: hpcattn recover {tmp}"], stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    deadline = time.time() + 20                  # the launcher may return before its ranks are gone
    while os.path.exists(f"/proc/{owner['pid']}") and time.time() < deadline:
        time.sleep(0.1)
    code, _, err = run_inprocess(capfd, ["run", cfg, "-o", str(out)])         # the third run
    line = one_error_line(err)
    assert code == 2 and "a run that died" in line and f"hpcattn recover {tmp}" in line, line
    recover(str(tmp))
    meta, rows = read_cases(str(out))
    assert meta["status"] == "incomplete" and len(rows) == 2 and not lock_path(tmp).exists()


@pytest.mark.mpi
def test_1_rank_ctrl_c_is_one_line(tmp_path):
    cfg = write(tmp_path, "d.yaml", DECODE)
    proc = _launch(0, ["run", cfg, "-o", str(tmp_path / "i.h5")], {"HPCATTN_TEST_HANG_RANK": "0"})
    try:
        _wait_for_cases(tmp_path / "i.h5.tmp", 2, proc)
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, (proc.returncode, stderr)
    assert stderr.strip() == f"hpcattn: interrupted; finished cases are kept: hpcattn recover {tmp_path / 'i.h5.tmp'}"

"""The slurm/*.sbatch templates as shipped, under a real one-node Slurm; and the split-launch check.

The ``slurm``-marked tests submit the templates from the repository root exactly as the README
says (CPU mode: ``--gpus-per-node=0 --cpus-per-task=1``), with tiny shapes through the templates'
``--set`` passthrough. They need a running Slurm: ``scripts/slurm-localhost.sh start`` (root, Debian:
installs slurm-wlm, munge, libpmix-dev and starts munged, slurmctld, slurmd; ``.ci/run`` does it).
Without one they are skipped with that reason; with ``HPCATTN_REQUIRE_SLURM=1`` (set by ``.ci/run``
once it started Slurm) they fail instead. Their files (``runs/<job id>.h5*``,
``logs/*-<job id>*.out``) are removed afterwards.

The unmarked tests check :mod:`hpcattn.launch` on launcher environments, without Slurm.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

from hpcattn.launch import launcher_tasks, note_abort, refuse_split_launch, split_launch_message

ROOT = Path(__file__).resolve().parents[1]
CPU_MODE = ["--gpus-per-node=0", "--cpus-per-task=1"]   # the templates' documented CPU mode
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
        "BOOT_FAIL", "DEADLINE"}
TINY_DECODE = ["--set", "shape.context=1024", "--set", "shape.heads_q=8", "--set", "shape.heads_kv=2",
               "--set", "shape.head_dim=64", "--set", "run.warmup=0", "--set", "run.repeats=2"]
TINY_PREFILL = ["--set", "shape.context=256", "--set", "shape.heads_q=4", "--set", "shape.heads_kv=2",
                "--set", "shape.head_dim=32", "--set", "run.warmup=0", "--set", "run.repeats=2",
                "--set", "run.check_rows=64"]


# ------------------------------------------------------------------------------------------------
# hpcattn.launch (no Slurm needed)


@pytest.mark.parametrize("env,who", [
    ({"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "0"}, "srun"),
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}, "Open MPI"),
    ({"PMI_SIZE": "3", "PMI_RANK": "0"}, "PMI"),
    ({"MV2_COMM_WORLD_SIZE": "2"}, "MVAPICH"),
])
def test_split_launch_refused(env, who, capsys):
    msg = split_launch_message(1, env)
    assert msg is not None and who in msg and "MPI_COMM_WORLD has 1 rank" in msg
    assert ("--mpi=pmi2" in msg) == (who == "srun")
    assert refuse_split_launch(1, env)
    err = capsys.readouterr().err
    first = int(env.get("SLURM_PROCID", env.get("OMPI_COMM_WORLD_RANK", env.get("PMI_RANK", "0")))) == 0
    assert err.count("hpcattn: error: launched as") == (1 if first else 0)   # launcher task 0 only


@pytest.mark.parametrize("size,env", [
    (4, {"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "2"}),   # srun --mpi=pmi2: one world
    (1, {"SLURM_STEP_NUM_TASKS": "1"}),                         # srun -n 1
    (1, {"SLURM_NTASKS": "4", "SLURM_PROCID": "0"}),            # python in the batch step of a 4-task job
    (1, {"PMI_SIZE": "1", "PMI_RANK": "0"}),                    # mpiexec -n 1
    (1, {"OMPI_COMM_WORLD_SIZE": "x"}),                         # garbage is not a launcher
    (1, {}),                                                    # plain python
])
def test_launch_accepted(size, env, capsys):
    assert split_launch_message(size, env) is None
    assert not refuse_split_launch(size, env)
    assert capsys.readouterr().err == ""


def test_launcher_tasks_first_match():
    env = {"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1", "PMI_SIZE": "2", "PMI_RANK": "1"}
    assert launcher_tasks(env) == (2, 1, "SLURM_STEP_NUM_TASKS", "srun")


def test_note_abort_first_rank_wins(tmp_path):
    path = tmp_path / "abort"
    note_abort(4, {})                              # no HPCATTN_ABORT_FILE: nothing written anywhere
    assert not path.exists()
    note_abort(4, {"HPCATTN_ABORT_FILE": str(path)})
    note_abort(1, {"HPCATTN_ABORT_FILE": str(path)})   # a second rank: the first code stays
    assert path.read_text() == "4\n"
    note_abort(2, {"HPCATTN_ABORT_FILE": str(tmp_path / "no-dir" / "abort")})   # unwritable: no error


# ------------------------------------------------------------------------------------------------
# a real Slurm


def _slurm_reason() -> str | None:
    """Why Slurm cannot be used here (None: a controller answers and the node takes jobs)."""
    hint = "start a one-node Slurm with `scripts/slurm-localhost.sh start` (root, Debian/apt; .ci/run does it)"
    if shutil.which("sbatch") is None:
        return f"no sbatch on PATH: {hint}"
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    if ping.returncode != 0 or "UP" not in ping.stdout:
        said = ((ping.stdout + ping.stderr).strip().splitlines() or ["no output"])[0][:100]
        return f"no Slurm controller answers (scontrol ping: {said}): {hint}"
    states = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30).stdout.split()
    if not any(s.rstrip("*") in ("idle", "mix", "alloc") for s in states):
        return f"no Slurm node is up (sinfo states: {states}): {hint}"
    return None


@pytest.fixture(scope="module")
def slurm():
    """The environment to submit with; skips (or fails under HPCATTN_REQUIRE_SLURM=1) without Slurm."""
    reason = _slurm_reason()
    if reason:
        if os.environ.get("HPCATTN_REQUIRE_SLURM") == "1":
            pytest.fail(f"HPCATTN_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    for k in [k for k in env if k.startswith(("SBATCH_", "SLURM_", "HPCATTN_SWEEP_", "PMI_", "OMPI_"))
              and k != "SLURM_CONF"]:
        del env[k]
    env.pop("HPCATTN_VENV", None)
    env.pop("HPCATTN_SRUN_MPI", None)             # the templates' default PMI plug-in
    if Path(sys.executable).parent != ROOT / ".venv" / "bin":
        env["HPCATTN_PYTHON"] = sys.executable     # not the repository's venv: use this interpreter as is
    else:
        env.pop("HPCATTN_PYTHON", None)            # the templates' default: $SLURM_SUBMIT_DIR/.venv
    (ROOT / "runs").mkdir(exist_ok=True)
    jobs: list[str] = []
    yield env, jobs
    for j in jobs:                                 # never leave a test's job running
        subprocess.run(["scancel", j], capture_output=True)
        for p in [*ROOT.glob(f"runs/{j}.h5*"), *ROOT.glob(f"runs/sweep-{j}-*"), *ROOT.glob(f"logs/*-{j}*.out")]:
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


def _submit(slurm, template: str, args: list[str], opts: list[str] = (), env: dict | None = None) -> str:
    base_env, jobs = slurm
    cp = subprocess.run(["sbatch", "--parsable", *CPU_MODE, *opts, f"slurm/{template}", *args], cwd=ROOT,
                        capture_output=True, text=True, env=base_env | (env or {}), timeout=60)
    assert cp.returncode == 0, f"sbatch failed: {cp.stderr}"
    job = cp.stdout.strip().split(";")[0]
    jobs.append(job)
    return job


def _jobs(job: str) -> list[dict]:
    """``scontrol show job -o`` of ``job`` (an array: one dict per task) as key -> value."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]


def _wait(job: str, timeout: float = 240) -> list[dict]:
    """Poll until every task of ``job`` has ended; the tasks' records, sorted by task id."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        recs = _jobs(job)
        if recs and all(r.get("JobState") in DONE for r in recs) and not any("%" in r.get("ArrayTaskId", "")
                                                                          or "-" in r.get("ArrayTaskId", "")
                                                                          for r in recs):
            return sorted(recs, key=lambda r: int(r.get("ArrayTaskId", "0") or 0))
        time.sleep(0.3)
    subprocess.run(["scancel", job])
    pytest.fail(f"job {job} did not end within {timeout} s: {_jobs(job)}")


def _log(rec: dict) -> str:
    path = Path(rec["StdOut"])
    return path.read_text() if path.exists() else f"(no log at {path})"


def _report(*files: Path) -> list[dict]:
    cp = subprocess.run([sys.executable, "-m", "hpcattn", "report", "--csv", *map(str, files)], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stderr
    return list(csv.DictReader(io.StringIO(cp.stdout)))


@pytest.mark.slurm
@pytest.mark.parametrize("config,tiny,methods", [
    ("configs/decode_tree.yaml", TINY_DECODE, {"local", "tree", "ring"}),
    ("configs/prefill_ring.yaml", TINY_PREFILL, {"local", "ring"}),
])
def test_one_node(slurm, config, tiny, methods):
    """one_node.sbatch as shipped (CPU mode): 4 ranks in one MPI world, every check ok, a complete record."""
    job = _submit(slurm, "one_node.sbatch", [config, *tiny])
    (rec,) = _wait(job)
    log = _log(rec)
    assert (rec["JobState"], rec["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert "4 ranks on 1 node(s)" in log, log
    out = ROOT / "runs" / f"{job}.h5"
    rows = _report(out)
    assert {r["method"] for r in rows} == methods
    assert all(r["world_size"] == "4" and r["check"] == "ok" and r["status"] == "complete" for r in rows), rows
    with h5py.File(out, "r") as f:
        assert str(f.attrs["slurm_job_id"]) == job
    assert f"wrote runs/{job}.h5" in log


@pytest.mark.slurm
def test_sweep_array(slurm):
    """sweep_array.sbatch: one record per array task, all read by `hpcattn report`; a task without a
    value fails with exit 2 and a message naming --array."""
    values = ["512", "1024", "2048"]
    job = _submit(slurm, "sweep_array.sbatch", ["configs/decode_tree.yaml", *TINY_DECODE[2:],
                                                "--set", "methods=[local,tree]"],
                  opts=["--array=0-3", "--ntasks-per-node=2"],
                  env={"HPCATTN_SWEEP_KEY": "shape.context", "HPCATTN_SWEEP_VALUES": " ".join(values)})
    recs = _wait(job)
    assert [r["ArrayTaskId"] for r in recs] == ["0", "1", "2", "3"]
    for r in recs[:3]:
        assert (r["JobState"], r["ExitCode"]) == ("COMPLETED", "0:0"), _log(r)
    assert (recs[3]["JobState"], recs[3]["ExitCode"]) == ("FAILED", "2:0")
    assert "array task 3 has no value" in _log(recs[3]) and "--array=0-2" in _log(recs[3])
    files = sorted(ROOT.glob(f"runs/sweep-{job}-*.h5"))
    assert [f.name for f in files] == [f"sweep-{job}-{i:03d}.h5" for i in range(3)]
    rows = _report(*files)
    assert sorted((int(r["context"]), r["method"]) for r in rows) == sorted((int(v), m) for v in values
                                                                      for m in ("local", "tree"))
    assert all(r["world_size"] == "2" and r["check"] == "ok" for r in rows), rows


@pytest.mark.slurm
def test_multi_node_on_one_node(slurm):
    """multi_node.sbatch on one node over gloo: the rendezvous address it sets (HPCATTN_MASTER_ADDR,
    the first host of the allocation) works; and HPCATTN_PYTHON (no venv, the repository on
    PYTHONPATH) instead of the default venv."""
    job = _submit(slurm, "multi_node.sbatch", ["configs/decode_tree.yaml", *TINY_DECODE,
                                               "--set", "methods=[local,tree]", "--set", "comm.backend=gloo"],
                  opts=["--nodes=1", "--ntasks-per-node=2"], env={"HPCATTN_PYTHON": sys.executable})
    (rec,) = _wait(job)
    log = _log(rec)
    assert (rec["JobState"], rec["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert "rank 0: " in log and "transport gloo" in log and f"python {sys.executable}," in log, log
    rows = _report(ROOT / "runs" / f"{job}.h5")
    assert {r["method"] for r in rows} == {"local", "tree"} and all(r["check"] == "ok" for r in rows)


@pytest.mark.slurm
def test_bad_config_exit_2_no_record(slurm):
    """A bad --set: the job fails with exit 2, one error line naming the key, no record (4 ranks)."""
    job = _submit(slurm, "one_node.sbatch", ["configs/decode_tree.yaml", "--set", "shape.context=lots"])
    (rec,) = _wait(job)
    log = _log(rec)
    assert (rec["JobState"], rec["ExitCode"]) == ("FAILED", "2:0"), log
    errors = [line for line in log.splitlines() if line.startswith("hpcattn: error:")]
    assert len(errors) == 1 and "shape.context" in errors[0], log
    assert "Traceback" not in log, log
    assert not list(ROOT.glob(f"runs/{job}.h5*"))


@pytest.mark.slurm
def test_watchdog_exit_4(slurm):
    """The hang watchdog's MPI_Abort(4): srun alone would say 137; the template's job exits 4."""
    job = _submit(slurm, "one_node.sbatch", ["configs/decode_tree.yaml", *TINY_DECODE, "--set", "methods=[local]",
                                             "--set", "run.repeats=1000000", "--set", "run.case_timeout_s=2"],
                  opts=["--ntasks-per-node=2"])
    (rec,) = _wait(job)
    log = _log(rec)
    assert (rec["JobState"], rec["ExitCode"]) == ("FAILED", "4:0"), log
    assert "ran longer than run.case_timeout_s = 2 s" in log, log
    # srun says 137 (Slurm killed the step), or 4 itself when both ranks exited before the kill
    said = re.findall(r"hpcattn: the ranks ended in MPI_Abort\((\d+)\) \(the launcher exited (\d+)\)", log)
    assert said in ([("4", "137")], []), log
    assert said or "task 1: Exited with exit code 4" in log or "tasks 0-1: Exited with exit code 4" in log, log
    assert not list(ROOT.glob(f"runs/.abort-{job}"))


@pytest.mark.slurm
def test_missing_venv_exit_2(slurm):
    """The template without the venv it looks for: one clear line, exit 2, before any srun."""
    job = _submit(slurm, "one_node.sbatch", ["configs/decode_tree.yaml"],
                  env={"HPCATTN_VENV": str(ROOT / "no-such-venv"), "HPCATTN_PYTHON": ""})
    (rec,) = _wait(job)
    log = _log(rec)
    assert (rec["JobState"], rec["ExitCode"]) == ("FAILED", "2:0"), log
    assert log.startswith(f"hpcattn: error: no venv at {ROOT / 'no-such-venv'}: run `make setup`"), log


@pytest.mark.slurm
def test_scancel_then_recover(slurm):
    """scancel while the run is in its cases; `hpcattn recover` keeps the finished ones (status incomplete)."""
    contexts = [1024 * (i + 1) for i in range(8)]
    job = _submit(slurm, "one_node.sbatch", ["configs/decode_tree.yaml", *TINY_DECODE[2:], "--set", "methods=[local]",
                                             "--set", f"shape.context={contexts}", "--set", "run.repeats=1500"],
                  opts=["--ntasks-per-node=2"])
    parts = ROOT / "runs" / f"{job}.h5.tmp.d"
    end = time.monotonic() + 180
    while not list(parts.glob("*.h5")) and time.monotonic() < end:
        if _jobs(job) and _jobs(job)[0].get("JobState") in DONE:
            pytest.fail(f"job ended before its first case was written: {_log(_jobs(job)[0])}")
        time.sleep(0.2)
    assert list(parts.glob("*.h5")), f"no finished case within 180 s: {_jobs(job)}"
    subprocess.run(["scancel", job], check=True)
    (rec,) = _wait(job, timeout=60)
    assert rec["JobState"] == "CANCELLED", rec
    tmp = ROOT / "runs" / f"{job}.h5.tmp"
    assert not (ROOT / "runs" / f"{job}.h5").exists()
    cp = subprocess.run([sys.executable, "-m", "hpcattn", "recover", str(tmp)], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
    assert cp.returncode == 0, cp.stderr
    rows = _report(ROOT / "runs" / f"{job}.h5")
    assert 1 <= len(rows) < len(contexts), rows
    assert [int(r["context"]) for r in rows] == contexts[:len(rows)]
    assert all(r["status"] == "incomplete" and r["check"] == "ok" for r in rows), rows


@pytest.mark.slurm
def test_scancel_sigint_exit_130(slurm):
    """`scancel --signal=INT` (Ctrl-C for a batch job: srun's tasks get SIGINT): one `hpcattn:
    interrupted` line, and the job exits 130 although srun says 137 (the abort code passes through
    HPCATTN_ABORT_FILE, as the watchdog's 4 does)."""
    job = _submit(slurm, "one_node.sbatch", ["configs/decode_tree.yaml", *TINY_DECODE, "--set", "methods=[local]",
                                             "--set", "run.repeats=1000000"], opts=["--ntasks-per-node=2"])
    tmp = ROOT / "runs" / f"{job}.h5.tmp"         # the record is opened just before the first case
    end = time.monotonic() + 180
    while not tmp.exists() and time.monotonic() < end:
        if _jobs(job) and _jobs(job)[0].get("JobState") in DONE:
            pytest.fail(f"job ended before its case started: {_log(_jobs(job)[0])}")
        time.sleep(0.2)
    assert tmp.exists(), f"the run did not start its case within 180 s: {_jobs(job)}"
    time.sleep(1)                                  # in the case now (a million repeats: hours)
    subprocess.run(["scancel", "--signal=INT", job], check=True)
    (rec,) = _wait(job, timeout=90)
    log = _log(rec)
    assert (rec["JobState"], rec["ExitCode"]) == ("FAILED", "130:0"), log
    ours = [line for line in log.splitlines() if line.startswith("hpcattn: interrupted")]
    assert ours == [f"hpcattn: interrupted; finished cases are kept: hpcattn recover runs/{job}.h5.tmp"], log
    said = re.findall(r"hpcattn: the ranks ended in MPI_Abort\((\d+)\) \(the launcher exited (\d+)\)", log)
    assert said in ([("130", "137")], []), log
    assert "Traceback" not in log and not list(ROOT.glob(f"runs/.abort-{job}"))


@pytest.mark.slurm
def test_bare_srun_refused(slurm):
    """`srun -n 2` without --mpi (MpiDefault=none): two 1-rank worlds; hpcattn refuses, one error line,
    exit 2 on both tasks, no record."""
    env, _ = slurm
    out = ROOT / "runs" / f"bare-srun-{os.getpid()}.h5"
    cp = subprocess.run(["srun", "-n", "2", "--mpi=none", *CPU_MODE[1:], sys.executable, "-m", "hpcattn", "run",
                         "configs/decode_tree.yaml", *TINY_DECODE, "-o", str(out)],
                        cwd=ROOT, capture_output=True, text=True, env=env | {"PYTHONPATH": str(ROOT)}, timeout=180)
    assert cp.returncode == 2, cp.stdout + cp.stderr
    errors = [line for line in cp.stderr.splitlines() if line.startswith("hpcattn: error:")]
    assert len(errors) == 1 and "SLURM_STEP_NUM_TASKS=2" in errors[0] and "--mpi=pmi2" in errors[0], cp.stderr
    assert not list(out.parent.glob(out.name + "*"))

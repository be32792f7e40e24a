"""The commands of README.md, docs/*.md and jobs/device_validate.sh stay runnable.

Every ``hpcattn <subcommand> ...`` line of their code blocks (continuation lines joined) is either
executed here, on one CPU rank in this process, or listed in SKIP with the reason:

* ``run``: planned at its documented rank count (``--dry-run --ranks N``: config path, every
  ``--set`` key, the combination checks at N ranks); a GPU node's line (docs/performance.md,
  jobs/device_validate.sh, configs/bench/, nccl/cuda) is planned for GPUs (``run.device=cuda``)
  and not run; the CPU ones with an ``-o`` also run for real with tiny shapes appended (later
  ``--set`` wins), which writes the records the ``report``/``plot`` lines read;
* ``project``: executed with tiny shapes appended;
* ``report``, ``plot``, ``recover``, ``config``: executed as written (``runs/*.h5`` globbed).
"""

from __future__ import annotations

import glob
import json
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hpcattn import cli
from tests.mpirun import ROOT

SOURCES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")),
           "jobs/device_validate.sh"]
SUBCOMMANDS = ("run", "report", "plot", "recover", "config", "project", "compare", "check-comm")
COMMAND = re.compile(r"(?:^|\s)(?:-m\s+)?hpcattn\s+(%s)(?=\s|$)(.*)$" % "|".join(SUBCOMMANDS))

# substring of the command line -> why it is not executed here
SKIP = {
    "check-comm": "an MPI job of its own (several ranks; jobs/device_validate.sh runs it on GPUs)",
    "compare": "placeholder record names (old.h5/new.h5, runs/d2b.h5, runs/123.h5); tests/test_analysis.py runs it",
    "runs/123.h5": "placeholder record names",
    "sweep.yaml": "a config the page writes inline",
    "decode_file.yaml": "a config the page writes inline (and an input file it generates)",
    "/ckpt/": "a checkpoint path of the reader's machine",
    "/m/model.gguf": "a GGUF path of the reader's machine (tests/test_real_model.py runs the eval job)",
    "runs/eval-p": "eval records of the reader's runs (tests/test_real_model.py reports eval records)",
    "$OUT": "the eval script's output folder (jobs/eval_smollm2.sh)",
    "that.yaml": "a config the reader extracts from a record",
    "CONFIG.yaml": "the synopsis",
    "--kind scaling": "needs records at several rank counts (the real runs here are 1 rank); "
                      "tests/test_analysis.py runs it",
}
TINY = ["--set", "shape.batch=1", "--set", "shape.heads_q=4", "--set", "shape.heads_kv=2", "--set", "shape.head_dim=16",
        "--set", "shape.context=128", "--set", "run.warmup=0", "--set", "run.repeats=1", "--set", "run.check_rows=16"]
TINY_APPROX = ["--set", "shape.query_len=8", "--set", "apb.anchor_len=8", "--set", "apb.passing_len=4"]
# a generate config's projection (model level): the tiny model, 128 tokens, 8-token query, 2 new tokens
TINY_MODEL = ["--set", "model.preset=tiny", "--set", "shape.dtype=float32", "--set", "shape.context=128",
              "--set", "generate.query_len=8", "--set", "generate.new_tokens=2", "--set", "apb.anchor_len=8",
              "--set", "apb.passing_len=4", "--set", "run.repeats=1"]


def _tiny_project(argv: list[str]) -> list[str]:
    """A documented ``project`` line with tiny shapes appended (model level for a generate config)."""
    cfg = Path(argv[1])
    model_level = cfg.is_file() and re.search(r"^job:\s*generate", cfg.read_text(), re.M) is not None
    return argv + (TINY_MODEL if model_level else TINY + TINY_APPROX)


def documented_commands() -> list[tuple[str, int, str, list[str]]]:
    """(source, ranks, sub-command, argv) of every documented command line."""
    found = []
    for src in SOURCES:
        text = (ROOT / src).read_text()
        lines = text.splitlines() if src.endswith(".sh") else _code_lines(text)
        loops = dict(re.findall(r"for (\w+) in ([\w ]+); do", text))     # a script's loop values
        expanded = []
        for line in _joined(lines):
            var = next((v for v in loops if f"${v}" in line), None)
            expanded += [line.replace(f"${var}", x) for x in loops[var].split()] if var else [line]
        for line in expanded:
            m = COMMAND.search(line)
            if not m:
                continue
            prefix = line[:m.start()]
            n = re.search(r"-n\s+(\d+)", prefix)
            ranks = int(n.group(1)) if n else (2 if re.search(r"\$(MPIRUN|M)\b", prefix) else 1)
            found.append((src, ranks, m.group(1), line.strip()))
    return found


def _code_lines(md: str) -> list[str]:
    out, inside = [], False
    for line in md.splitlines():
        if line.lstrip().startswith("```"):
            inside = not inside
            continue
        if inside:
            out.append(re.sub(r"^\s*\$ ", "", line))
    return out


def _joined(lines):
    buf = ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        yield buf + line
        buf = ""


def _argv(cmd: str, line: str) -> list[str]:
    rest = COMMAND.search(line).group(2)
    words = []
    for w in shlex.split(rest.replace("$OUT", "runs"), comments=True):
        if w in ("|", ">", "2>&1", "&&", ";") or w.startswith((">", "2>")):
            break
        words.append(w)
    return [cmd, *words]


def _output(argv):
    return argv[argv.index("-o") + 1] if "-o" in argv else None


GPU_SOURCES = ("docs/performance.md", "jobs/device_validate.sh", "docs/cuda-aware-mpi.md")


def _gpu_only(src, argv) -> bool:
    """A GPU node's command: planned for GPUs (run.device=cuda), never run here."""
    text = " ".join(argv)
    if src in GPU_SOURCES or "configs/bench/" in text or "nccl" in text or "cuda" in text:
        return True
    cfg = Path(argv[1])
    return cfg.is_file() and re.search(r"device:\s*cuda|backend:\s*nccl", cfg.read_text()) is not None


def _main(capfd, argv, what):
    argv = [x for w in argv for x in (sorted(glob.glob(w)) or [w] if "*" in w else [w])]
    try:
        code = cli.main(argv)
    except SystemExit as e:                         # argparse
        code = e.code
    out, err = capfd.readouterr()
    assert code == 0, f"{what}\n-> hpcattn {' '.join(argv)}: exit {code}\n{err[-2000:]}"
    return out


def _killed_run(tmp: Path) -> None:
    """``NAME.tmp`` of a run that died after its first case (made from the finished ``NAME``;
    its lock names a process that has exited)."""
    from hpcattn.results.hdf5 import RecordWriter, lock_path, read_cases

    meta, rows = read_cases(str(tmp.with_suffix("")), datasets=("time_s", "phase_s", "bytes_per_step"))
    w = RecordWriter(str(tmp.with_suffix("")), {k: v for k, v in meta.items() if k != "status"}, "job: decode",
                     [{"rank": 0}], {})
    row = rows[0]
    w.write_case(row["id"], {k: v for k, v in row.items() if k not in ("id", "file", "datasets")}, row["datasets"])
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    lock_path(tmp).write_text(json.dumps({"host": socket.gethostname(), "pid": dead, "started_utc": "-"}))


def test_commands_are_found():
    cmds = documented_commands()
    by = {(src, sub) for src, _, sub, _ in cmds}
    assert {("README.md", "run"), ("README.md", "report"), ("README.md", "recover"),
            ("docs/methods.md", "project"), ("jobs/device_validate.sh", "project")} <= by, sorted(by)
    assert any("shape.query_len=64" in line for *_, line in cmds)


def test_documented_commands_run(tmp_path, monkeypatch, capfd):
    """Each page's commands in page order, from a fresh directory (its own runs/)."""
    pytest.importorskip("matplotlib")
    planned, ran, skipped, unmade = [], [], [], set()
    pages: dict[str, list] = {}
    for src, n, sub, line in documented_commands():
        why = next((r for k, r in SKIP.items() if k in line), None)
        if why:
            skipped.append((src, line, why))
        else:
            pages.setdefault(src, []).append((n, sub, line, _argv(sub, line)))
    for i, (src, cmds) in enumerate(pages.items()):
        here = tmp_path / f"page{i}"
        (here / "runs").mkdir(parents=True)
        (here / "configs").symlink_to(ROOT / "configs")
        monkeypatch.chdir(here)
        for n, sub, line, argv in cmds:
            what = f"{src}: {line}"
            if sub == "run":      # planned at its rank count; a CPU line with -o also runs, tiny
                gpu = _gpu_only(src, argv)
                plan = [a for a in argv if a != "--dry-run"] + ["--dry-run"] + \
                    ([] if "--ranks" in argv else ["--ranks", str(n)])
                _main(capfd, plan + (["--set", "run.device=cuda"] if gpu else []), what)
                planned.append(line)
                out = _output(argv)
                tiny = argv + TINY + (TINY_APPROX if "apb" in argv[1] else [])
                if out and not gpu and not Path(out).exists():
                    if cli.main(tiny + ["--dry-run", "--ranks", "1"]) != 0:    # needs its rank count
                        skipped.append((src, line, "planned at %d ranks; %s" % (n, capfd.readouterr().err.strip())))
                        unmade.add(out)
                        continue
                    _main(capfd, tiny, what + " (tiny shapes)")
                    ran.append(line)
                continue
            if unmade & set(argv):
                skipped.append((src, line, "reads the record of a run planned above but not run here"))
                continue
            if any("*" in w and not glob.glob(w) for w in argv):
                skipped.append((src, line, "no record of this page's CPU runs matches the pattern"))
                continue
            if sub == "recover" and not Path(argv[1]).exists() and Path(argv[1]).with_suffix("").exists():
                _killed_run(Path(argv[1]))                          # what `hpcattn recover` is for
            _main(capfd, _tiny_project(argv) if sub == "project" else argv, what)
            ran.append(line)
    assert len(planned) >= 10 and len(ran) >= 10, (planned, ran)
    print(f"{len(planned)} run lines planned, {len(ran)} commands executed, {len(skipped)} skipped:")
    for src, line, why in skipped:
        print(f"  skipped {src}: {line}  ({why})")

"""Offline analysis on records the suite writes with real runs (1, 2 and 4 CPU ranks): the pandas API
(hpcattn.results.load / load_ranks), hpcattn compare, the plot kinds (rendered to PNG), plot -o
errors, and the docs/analysis.md recipes (h5py + pandas without hpcattn; h5ls/h5dump)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from hpcattn.results.hdf5 import read_cases
from tests.mpirun import ROOT, run_ranks

pytestmark = pytest.mark.mpi

CONFIG = """
job: decode
methods: [local, tree, ring]
shape: {batch: 2, heads_q: 8, heads_kv: 2, head_dim: 32, context: [300, 1000], dtype: float32}
tree: {reduction: [allgather]}          # a one-point sweep: a sweep_point entry
run: {warmup: 1, repeats: 3}
"""
CASES = 6                                       # 2 contexts x (local, tree, ring)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """{ranks: path} of one decode sweep run at 1, 2 and 4 ranks (three small mpiexec launches)."""
    d = tmp_path_factory.mktemp("records")
    cfg = d / "decode.yaml"
    cfg.write_text(textwrap.dedent(CONFIG))
    out = {}
    for n in (1, 2, 4):
        out[n] = d / f"decode-p{n}.h5"
        r = run_ranks(n, ["-m", "hpcattn", "run", str(cfg), "-o", str(out[n])])
        assert r.returncode == 0, r.stdout + r.stderr
    return out


def hpcattn(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "hpcattn", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


def one_error_line(r, *words):
    """Exit 2 and exactly one stderr line, ``hpcattn: error: ...`` containing ``words``; no traceback."""
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("hpcattn: error: "), r.stdout + r.stderr
    assert all(w in lines[0] for w in words), lines[0]


def assert_png(path):
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0   # not blank


# ------------------------------------------------------------------------------------------------
# pandas API


def test_load_one_row_per_case_with_sweep_columns_and_run_metadata(records):
    from hpcattn.results import load

    path = records[2]
    meta, rows = read_cases(str(path))
    df = load([path, records[4]])
    assert len(df) == 2 * CASES and list(df.columns[:2]) == ["file", "id"]
    p2 = df[df.file == str(path)]
    assert list(p2.id) == [r["id"] for r in rows]
    assert (p2["shape.context"] == p2["context"]).all() and set(p2["shape.context"]) == {300, 1000}
    assert set(df["tree.reduction"]) == {"allgather"}
    assert (df.status == "complete").all() and (p2.git_commit == meta["git_commit"]).all()
    assert list(df.world_size.drop_duplicates()) == [2, 4]
    for r in rows:                              # the case attributes, unchanged
        got = p2[p2.id == r["id"]].iloc[0]
        assert got.time_median_s == r["time_median_s"] and got.method == r["method"]
    local = p2[p2.method == "local"]
    assert np.allclose(local.speedup, 1.0)
    tree = p2[p2.method == "tree"].set_index("context")
    assert np.allclose(tree.speedup, local.set_index("context").time_median_s / tree.time_median_s)


def test_load_ranks_is_the_per_rank_datasets(records):
    from hpcattn.results import load, load_ranks

    path = records[4]
    lr = load_ranks(path)
    assert len(lr) == CASES * 3 * 4 * 3        # cases x repeats x ranks x phases
    assert set(lr.phase) == {"compute", "comm", "merge"}
    with h5py.File(path, "r") as f:
        for cid, g in f["cases"].items():
            c = lr[lr.id == cid]
            t, ph, by = g["time_s"][()], g["phase_s"][()], g["bytes_per_step"][()]
            comm = c[c.phase == "comm"].sort_values(["repeat", "rank"])
            assert np.array_equal(comm.phase_s.to_numpy(), ph[:, :, 1].ravel())
            assert np.array_equal(comm.time_s.to_numpy(), t.ravel())
            first = c[c.repeat == 0].sort_values(["rank", "phase"])
            assert np.array_equal(first.bytes_per_step.to_numpy(), by[:, [1, 0, 2]].ravel())  # comm, compute, merge
    step = lr.groupby(["file", "id", "repeat"]).time_s.max().groupby(["file", "id"]).median()
    cases = load(path).set_index(["file", "id"])
    assert np.allclose(step.loc[cases.index], cases.time_median_s)
    assert (lr[lr.method == "tree"].bytes_per_step > 0).any()


def test_results_import_without_pandas_and_h5py_readers_still_work(records, tmp_path):
    code = textwrap.dedent(f"""
        import sys
        sys.modules["pandas"] = None           # import pandas -> ImportError
        import hpcattn.results
        from hpcattn.errors import HpcattnError
        from hpcattn.results.report import format_table, rows_from_files
        from hpcattn.results.compare import compare
        from hpcattn.results.plot import plot
        assert len(rows_from_files([{str(records[2])!r}])) == {CASES}
        assert compare({str(records[2])!r}, {str(records[2])!r}).exit_status == 0
        plot([{str(records[2])!r}], {str(tmp_path / "t.png")!r}, "breakdown")
        try:
            hpcattn.results.load({str(records[2])!r})
        except HpcattnError as e:
            print("error:", e)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "error: hpcattn.results.load/load_ranks need pandas: pip install 'hpcattn[analysis]'"
    assert_png(tmp_path / "t.png")


# ------------------------------------------------------------------------------------------------
# compare


def scaled_copy(src, dst, factors: dict, band: float | None = None):
    """Copy a record, multiplying the recorded step times of case id -> factor (median, p10, p90);
    ``band``: also set p10/p90 to median * (1 -/+ band)."""
    shutil.copy(src, dst)
    with h5py.File(dst, "a") as f:
        for cid, x in factors.items():
            a = f["cases"][cid].attrs
            for k in ("time_median_s", "time_p10_s", "time_p90_s"):
                a[k] = a[k] * x
            if band is not None:
                a["time_p10_s"], a["time_p90_s"] = a["time_median_s"] * (1 - band), a["time_median_s"] * (1 + band)
    return dst


def verdicts(stdout: str) -> dict[str, tuple[float, str]]:
    rows = [l.split() for l in stdout.splitlines() if re.match(r"c\d{4}-", l)]
    return {r[0]: (float(r[-3].rstrip("x")), r[-1]) for r in rows}


def test_compare_same_record_is_all_same_exit_0(records):
    r = hpcattn("compare", records[2], records[2])
    assert r.returncode == 0, r.stdout + r.stderr
    v = verdicts(r.stdout)
    assert len(v) == CASES and all(x == (1.0, "same") for x in v.values()), r.stdout
    assert f"compare: {CASES} matched, 0 slower, 0 faster" in r.stdout


def test_compare_flags_a_slowdown_beyond_noise_exit_1(records, tmp_path):
    from hpcattn.results.compare import compare, spread

    old = records[2]
    rows = {x["id"]: x for x in read_cases(str(old))[1]}
    ids = list(rows)
    slow, small, fast = sorted(ids, key=lambda c: spread(rows[c]))[:3]     # the least noisy cases
    new = scaled_copy(old, tmp_path / "new.h5", {slow: 10.0, small: 1.0 + 0.5 * 0.05, fast: 0.1})
    r = hpcattn("compare", old, new)
    assert r.returncode == 1, r.stdout + r.stderr
    v = verdicts(r.stdout)
    assert v[slow] == (10.0, "slower") and v[fast] == (0.1, "faster")
    assert v[small][1] == "same" and all(v[c][1] == "same" for c in ids if c not in (slow, fast))
    res = compare(str(old), str(new))
    m = next(x for x in res.matches if x.new["id"] == slow)
    assert m.tol == pytest.approx(max(0.05, 2 * spread(rows[slow])))   # same band in both (scaled together)
    assert [x.new["id"] for x in res.regressions] == [slow]
    # a 30% slowdown inside a +-40% repeat band is noise; with a tight band it is a regression
    wide = scaled_copy(old, tmp_path / "wide.h5", {slow: 1.3}, band=0.4)
    assert verdicts(hpcattn("compare", old, wide).stdout)[slow][1] == "same"
    tight = scaled_copy(old, tmp_path / "tight.h5", {slow: 1.3}, band=0.01)
    assert compare(str(tight), str(scaled_copy(tight, tmp_path / "t2.h5", {slow: 1.3}, band=0.01))) \
        .regressions[0].new["id"] == slow
    # --threshold raises the bar above the spread
    assert hpcattn("compare", old, new, "--threshold", "10").returncode == 0


def test_compare_lists_unmatched_and_refuses_nothing_in_common(records, tmp_path):
    old = records[2]
    gone = read_cases(str(old))[1][3]["id"]
    new = tmp_path / "fewer.h5"
    shutil.copy(old, new)
    with h5py.File(new, "a") as f:
        del f["cases"][gone]
    r = hpcattn("compare", old, new)
    assert r.returncode == 0 and f"only in {old}: {gone}" in r.stdout, r.stdout + r.stderr
    assert f"compare: {CASES - 1} matched" in r.stdout and "1 only in old, 0 only in new" in r.stdout
    one_error_line(hpcattn("compare", records[1], records[2]), "no case in common")   # other rank count
    one_error_line(hpcattn("compare", old, old, "--threshold", "-0.1"), "--threshold", "-0.1")
    one_error_line(hpcattn("compare", old, tmp_path / "missing.h5"), "missing.h5", "cannot open")


# ------------------------------------------------------------------------------------------------
# plots


def test_plot_breakdown_stacks_phases_of_the_slowest_rank(records, tmp_path):
    import matplotlib.pyplot as plt

    from hpcattn.results.plot import figure, phase_split

    paths = [str(records[2]), str(records[4])]
    fig = figure(paths, "breakdown")
    ax = fig.axes[0]
    assert len(ax.patches) == 2 * CASES * 4            # one bar per case and segment
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["compute", "comm", "merge", "other"]
    tops = {}
    for p in ax.patches:
        x = round(p.get_x() + p.get_width() / 2)
        tops[x] = max(tops.get(x, 0.0), p.get_y() + p.get_height())
    _, rows = read_cases(paths[1], datasets=("time_s", "phase_s"))
    for i, r in enumerate(rows):                       # bar height = median repeat's slowest-rank time
        t = r["datasets"]["time_s"][0]
        assert tops[CASES + i] == pytest.approx(np.median(t.max(axis=1)) * 1e3, rel=1e-9)
        parts = phase_split(r)
        assert sum(parts.values()) == pytest.approx(np.median(t.max(axis=1)), rel=1e-9)
    plt.close(fig)
    png = tmp_path / "breakdown.png"
    r = hpcattn("plot", *paths, "--kind", "breakdown", "-o", png)
    assert r.returncode == 0 and f"wrote {png}" in r.stdout, r.stderr
    assert_png(png)


def test_plot_scaling_speedup_vs_ranks_across_records(records, tmp_path):
    import matplotlib.pyplot as plt

    from hpcattn.results import load
    from hpcattn.results.plot import figure

    paths = [str(records[n]) for n in (1, 2, 4)]
    fig = figure(paths, "scaling")
    ax = fig.axes[0]
    lines = {l.get_label(): l for l in ax.lines}
    assert len(lines) == 4 + 1                          # (tree, ring) x 2 contexts + ideal
    ideal = lines["ideal (speedup = ranks)"]
    assert list(ideal.get_xdata()) == [1, 2, 4] and list(ideal.get_ydata()) == [1, 2, 4]
    df = load(paths)
    for N in (300, 1000):
        base = df[(df.method == "local") & (df.context == N)].time_median_s.median()
        ring = df[(df.method == "ring") & (df.context == N)].sort_values("world_size")
        line = lines[f"ring (N={N}, B=2, float32)"]
        assert list(line.get_xdata()) == [1, 2, 4]
        assert np.allclose(line.get_ydata(), base / ring.time_median_s.to_numpy())
    plt.close(fig)
    png = tmp_path / "scaling.png"
    r = hpcattn("plot", *paths, "--kind", "scaling", "-o", png)
    assert r.returncode == 0, r.stderr
    assert_png(png)
    one_error_line(hpcattn("plot", paths[1], "--kind", "scaling", "-o", png), "two or more rank counts")


def test_plot_bandwidth_against_a_ceiling(records, tmp_path):
    import matplotlib.pyplot as plt

    from hpcattn.results import load
    from hpcattn.results.plot import figure, plot, spec_hbm_tbs

    path = str(records[2])
    fig = figure([path], "bandwidth", ceiling_tbs=0.02)
    ax = fig.axes[0]
    lines = {l.get_label(): l for l in ax.lines}
    assert len(lines) == 3 + 1                          # local, tree, ring + ceiling
    ceiling = lines["ceiling 0.02 TB/s (--ceiling-tbs)"]
    assert set(ceiling.get_ydata()) == {0.02}
    df = load(path)
    for method, devices in (("local", 1), ("tree", 2)):
        rs = df[df.method == method].sort_values("context")
        kv = 2 * rs.context * rs.batch * rs.heads_kv * rs.head_dim * 4     # float32 K and V
        label = f"{method}{' allgather/flat' if method == 'tree' else ''} (p=2, B=2, float32)"
        assert np.allclose(lines[label].get_ydata(), kv / rs.time_median_s / devices / 1e12)
    plt.close(fig)
    fig = figure([path], "bandwidth")                  # CPU record: no GPU name, no ceiling
    assert len(fig.axes[0].lines) == 3 and "no ceiling" in fig.axes[0].get_title()
    plt.close(fig)
    h200 = tmp_path / "h200.h5"                        # the ceiling from the record's GPU name
    shutil.copy(path, h200)
    with h5py.File(h200, "a") as f:
        del f["meta/hosts/gpu_name"]
        f["meta/hosts"].create_dataset("gpu_name", data=["NVIDIA H200"] * 2, dtype=h5py.string_dtype())
    fig = figure([str(h200)], "bandwidth")
    spec = [l for l in fig.axes[0].lines if l.get_label().startswith("spec HBM NVIDIA H200")]
    assert len(spec) == 1 and set(spec[0].get_ydata()) == {4.8}
    plt.close(fig)
    assert spec_hbm_tbs("NVIDIA H20") == 4.0 and spec_hbm_tbs("NVIDIA H100 PCIe") is None
    png = tmp_path / "bw.png"
    assert plot([path], str(png), "bandwidth", 0.02) == str(png)
    assert_png(png)


def test_plot_time_default_kind_png(records, tmp_path):
    png = tmp_path / "time.pdf"
    r = hpcattn("plot", records[1], records[2], "-o", png)
    assert r.returncode == 0 and png.read_bytes()[:5] == b"%PDF-", r.stderr


def test_plot_output_errors_are_one_line_exit_2(records, tmp_path, capsys):
    from hpcattn.cli import main

    rec = str(records[2])
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir.png").mkdir()
    one_error_line(hpcattn("plot", rec, "-o", tmp_path / "x.jpg"), "x.jpg", "unsupported suffix '.jpg'", ".png")
    for args, words in (([tmp_path / "noext"], ["unsupported suffix '(none)'"]),      # the same, in-process
                        ([tmp_path / "missing" / "x.png"], ["missing", "does not exist"]),
                        ([tmp_path / "afile" / "x.png"], ["afile", "is not a folder"]),
                        ([tmp_path / "adir.png"], ["adir.png", "is a folder"]),
                        ([tmp_path / "x.png", "--kind", "pie"], ["--kind pie", "breakdown"]),
                        ([tmp_path / "x.png", "--ceiling-tbs", "3"], ["--ceiling-tbs"])):
        rc = main(["plot", rec, "-o", *map(str, args)])
        err = capsys.readouterr().err
        one_error_line(subprocess.CompletedProcess([], rc, "", err), *words)
    assert not list(tmp_path.glob("x.*")) and not (tmp_path / "missing").exists()


# ------------------------------------------------------------------------------------------------
# docs/analysis.md recipes


def doc_block(start: str) -> str:
    """The fenced block of docs/analysis.md whose first line starts with ``start``."""
    blocks, cur = [], None
    for line in (ROOT / "docs" / "analysis.md").read_text().splitlines(keepends=True):
        if line.startswith("```"):
            blocks, cur = (blocks + ["".join(cur)], None) if cur is not None else (blocks, [])
        elif cur is not None:
            cur.append(line)
    found = [b for b in blocks if b.startswith(start)]
    assert len(found) == 1, f"docs/analysis.md: no single block starting {start!r}"
    return found[0]


def test_docs_recipe_h5py_pandas_without_hpcattn(records, tmp_path):
    from hpcattn.results import load

    path = str(records[4])
    recipe = doc_block("# recipe:")
    assert 'path = "runs/tree.h5"' in recipe and "hpcattn" not in recipe.replace("# recipe: an hpcattn", "")
    code = recipe.replace('path = "runs/tree.h5"', f"path = {path!r}") + textwrap.dedent("""
        import sys
        assert not [m for m in sys.modules if m.startswith("hpcattn")], "the recipe imported hpcattn"
        print("RESULT", json.dumps({"ids": list(cases.id), "median": median.to_dict(), "status": list(cases.status),
                                    "context": list(map(int, cases["shape.context"])), "rows": len(ranks)}))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads(r.stdout.split("RESULT ", 1)[1])
    want = load(path)
    assert got["ids"] == list(want.id) and got["status"] == ["complete"] * CASES
    assert got["context"] == list(want.context) and got["rows"] == CASES * 3 * 4 * 3
    assert np.allclose([got["median"][i] for i in want.id], want.time_median_s)


@pytest.mark.skipif(not (shutil.which("h5ls") and shutil.which("h5dump")),
                    reason="h5ls/h5dump not installed (apt-get install hdf5-tools); "
                           "test_docs_recipe_h5py_pandas_without_hpcattn covers reading without hpcattn")
def test_docs_h5ls_h5dump_lines(records, tmp_path):
    path = records[2]
    rows = read_cases(str(path))[1]
    case = next(r for r in rows if r["id"] == "c0001-tree-allgather-flat")
    block = doc_block("h5ls -r runs/tree.h5")
    outs = []
    for line in block.strip().splitlines():
        cmd = line.split("#")[0].split()
        cmd = [str(path) if a == "runs/tree.h5" else a.replace("c0001-tree-allreduce-flat", case["id"]) for a in cmd]
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, (cmd, r.stderr)
        outs.append(r.stdout)
    ls, attrs, one, times, cfg = outs
    assert all(f"/cases/{r['id']}/time_s" in ls for r in rows)
    assert '"status"' in attrs and '"complete"' in attrs and '"git_commit"' in attrs
    assert f"{case['time_median_s']:.6g}" in one
    with h5py.File(path, "r") as f:
        t = f["cases"][case["id"]]["time_s"][()]
    assert f"( {t.shape[0]}, {t.shape[1]} )" in times and f"{t[0, 0]:.6g}" in times
    assert "decode" in cfg and "heads_kv" in cfg

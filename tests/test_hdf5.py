"""HDF5 run record (crash-safe NAME.tmp + NAME.tmp.d/ -> NAME) and HDF5 input files."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest
import torch

from hpcattn.errors import InputError
from hpcattn.jobs.inputs import file_shape, read_tokens, write_input_file
from hpcattn.results.hdf5 import SCHEMA_VERSION, RecordWriter, read_cases, recover

HOSTS = [
    {"rank": 0, "local_rank": 0, "node": 0, "hostname": "n0", "device": "cpu", "gpu_name": None},
    {"rank": 1, "local_rank": 1, "node": 0, "hostname": "n0", "device": "cpu", "gpu_name": None},
]
ROOT_ATTRS = {"world_size": 2, "transport": "mpi_host", "versions": {"torch": "2.x", "mpi4py": "4"},
              "ranks_list": [0, 1], "note": None, "check": True}


def make_writer(path):
    return RecordWriter(str(path), ROOT_ATTRS, "job: decode\nshape:\n  context: 8\n", HOSTS,
                        {"backend": "torch_ref", "selftest": {"torch_ref": "reference"}})


def case_data(repeats=3, ranks=2):
    t = np.arange(repeats * ranks, dtype=np.float64).reshape(repeats, ranks) * 1e-3
    big = np.random.default_rng(0).standard_normal((2, 3000)).astype(np.float32)  # > 4096: gzip
    return {
        "time_s": (t, {"unit": "s"}),
        "bytes_per_step": (np.array([[10, 20], [10, 20]], dtype=np.int64), {"phases": ["comm", "merge"]}),
        "out": (big, {}),
    }


CASE_ATTRS = {"method": "tree", "variant": "allgather/flat",
              "shape": {"batch": 1, "context": 8}, "phases": ["compute", "comm"],
              "median_s": 0.0015, "passed": True, "error": None}


READER = textwrap.dedent("""
    import json, sys
    import h5py
    from hpcattn.results.hdf5 import read_cases
    path = sys.argv[1]
    with h5py.File(path, "r", locking=False) as f:      # the metadata file: no case inside yet
        res = {"status": str(f.attrs["status"]), "schema_version": int(f.attrs["schema_version"]),
               "cases": list(f["cases"])}
    meta, rows = read_cases(path)
    res["read_cases"] = {"status": meta["status"], "ids": [r["id"] for r in rows],
                         "method": rows[0]["method"]}
    print(json.dumps(res))
""")


def test_record_tmp_while_open_then_renamed(tmp_path):
    path = tmp_path / "sub" / "run.h5"
    tmp = tmp_path / "sub" / "run.h5.tmp"
    w = make_writer(path)
    # while running: NAME.tmp (metadata, closed) and one finished file per case in NAME.tmp.d/
    assert tmp.exists() and not path.exists()
    w.write_case("c000", CASE_ATTRS, case_data())
    assert tmp.exists() and not path.exists()
    assert [x.name for x in (tmp_path / "sub" / "run.h5.tmp.d").iterdir()] == ["00000-c000.h5"]

    # another process reads the unfinished record: read_cases joins NAME.tmp and its case files
    got = json.loads(subprocess.run(
        [sys.executable, "-c", READER, str(tmp)], check=True, capture_output=True, text=True).stdout)
    assert got["status"] == "running"
    assert got["schema_version"] == SCHEMA_VERSION
    assert got["cases"] == []
    assert got["read_cases"] == {"status": "running", "ids": ["c000"], "method": "tree"}

    w.write_case("c001", dict(CASE_ATTRS, method="ring"), case_data())
    final = w.close()
    assert final == path
    assert path.exists() and not tmp.exists() and not (tmp_path / "sub" / "run.h5.tmp.d").exists()
    with h5py.File(path, "r") as f:
        assert f.attrs["status"] == "complete"
        assert list(f["cases"]) == ["c000", "c001"]      # insertion order kept
        assert f["meta/config_yaml"][()].decode().startswith("job: decode")
        np.testing.assert_array_equal(f["meta/hosts/rank"][()], [0, 1])
        assert f["meta/hosts/rank"].dtype == np.int64
        assert [x.decode() for x in f["meta/hosts/hostname"][()]] == ["n0", "n0"]
        assert f["meta/kernel"].attrs["backend"] == "torch_ref"
        out = f["cases/c000/out"]
        assert out.compression == "gzip"
        np.testing.assert_array_equal(out[()], case_data()["out"][0])
        assert f["cases/c000/time_s"].attrs["unit"] == "s"
        np.testing.assert_array_equal(f["cases/c000/bytes_per_step"][()], [[10, 20], [10, 20]])


CRASHER = textwrap.dedent("""
    import os, sys
    import numpy as np
    from hpcattn.results.hdf5 import RecordWriter
    w = RecordWriter(sys.argv[1], {"world_size": 1}, "job: decode", [{"rank": 0}], {})
    w.write_case("c000", {"method": "local"}, {"time_s": (np.ones((2, 1)), {})})
    w.write_case("c001", {"method": "tree"}, {"time_s": (np.ones((2, 1)), {})})
    os._exit(3)                       # die without closing: no rename, no final status
""")


def test_crashed_writer_leaves_readable_tmp(tmp_path):
    path = tmp_path / "crash.h5"
    r = subprocess.run([sys.executable, "-c", CRASHER, str(path)], capture_output=True, text=True)
    assert r.returncode == 3, r.stderr
    assert not path.exists()
    tmp = tmp_path / "crash.h5.tmp"
    meta, rows = read_cases(str(tmp))
    assert meta["status"] == "running"
    assert [(r["id"], r["method"]) for r in rows] == [("c000", "local"), ("c001", "tree")]
    # hpcattn recover: one file NAME with status "incomplete" and both cases
    r = subprocess.run([sys.executable, "-m", "hpcattn", "recover", str(tmp)], capture_output=True, text=True)
    assert r.returncode == 0 and str(path) in r.stdout, r.stdout + r.stderr
    assert not tmp.exists() and not (tmp_path / "crash.h5.tmp.d").exists()
    meta, rows = read_cases(str(path))
    assert meta["status"] == "incomplete" and [r["id"] for r in rows] == ["c000", "c001"]
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["cases/c001/time_s"][()], np.ones((2, 1)))
    r = subprocess.run([sys.executable, "-m", "hpcattn", "recover", str(path)], capture_output=True, text=True)
    assert r.returncode == 2 and "expected the NAME.tmp file" in r.stderr, r.stderr


KILLED = textwrap.dedent("""
    import os, signal, sys, threading
    import numpy as np
    from hpcattn.results.hdf5 import RecordWriter
    w = RecordWriter(sys.argv[1], {"world_size": 1}, "job: decode", [{"rank": 0}], {})
    w.write_case("c000", {"method": "local"}, {"time_s": (np.ones((2, 1)), {})})
    print("first", flush=True)
    big = np.random.default_rng(0).standard_normal((64, 2 ** 20))      # 512 MB: killed mid-write
    w.write_case("c001", {"method": "tree"}, {"out": (big, {})})
""")


def test_kill_during_a_case_write_keeps_the_finished_cases(tmp_path):
    path = tmp_path / "k.h5"
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "first"
    parts = tmp_path / "k.h5.tmp.d"
    deadline = time.time() + 60                # wait until the second case's file is being written
    while not any(x.name.endswith(".partial") for x in parts.iterdir()) and time.time() < deadline:
        time.sleep(0.005)
    assert any(x.name.endswith(".partial") for x in parts.iterdir())
    proc.kill()
    proc.wait()
    meta, rows = read_cases(str(tmp_path / "k.h5.tmp"))
    assert meta["status"] == "running" and [r["id"] for r in rows] == ["c000"]
    recover(str(tmp_path / "k.h5.tmp"))
    meta, rows = read_cases(str(path))
    assert meta["status"] == "incomplete" and [r["id"] for r in rows] == ["c000"]


def test_failure_during_the_merge_loses_nothing(tmp_path, monkeypatch):
    path = tmp_path / "m.h5"
    w = make_writer(path)
    w.write_case("c000", CASE_ATTRS, case_data())
    w.write_case("c001", dict(CASE_ATTRS, method="ring"), case_data())

    def killed(*args, **kw):
        raise KeyboardInterrupt("killed while merging")
    monkeypatch.setattr(h5py.Group, "copy", killed)
    with pytest.raises(KeyboardInterrupt):
        w.close()
    monkeypatch.undo()
    assert not path.exists()
    meta, rows = read_cases(str(tmp_path / "m.h5.tmp"))          # NAME.tmp and the case files untouched
    assert meta["status"] == "running" and [r["id"] for r in rows] == ["c000", "c001"]
    recover(str(tmp_path / "m.h5.tmp"))
    meta, rows = read_cases(str(path))
    assert meta["status"] == "incomplete" and [r["id"] for r in rows] == ["c000", "c001"]


def test_write_error_during_the_merge_is_raised_not_taken_for_a_bad_case(tmp_path, monkeypatch):
    """A full disk while writing the merged record (an OSError from the copy, the case files whole)
    is raised (as the one-line InputError): no case is dropped as "unreadable", no NAME.merging is left, NAME.tmp is intact."""
    path = tmp_path / "m.h5"
    w = make_writer(path)
    w.write_case("c000", CASE_ATTRS, case_data())

    def disk_full(*args, **kw):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(h5py.Group, "copy", disk_full)
    with pytest.raises(InputError, match=r"is full \(no space left\) while writing the merge"):
        w.close()                          # one line naming the file system (test_hostile_inputs.py)
    monkeypatch.undo()
    assert not path.exists() and not (tmp_path / "m.h5.merging").exists()
    assert [r["id"] for r in read_cases(str(tmp_path / "m.h5.tmp"))[1]] == ["c000"]


def test_bad_case_file_at_close_gives_incomplete_and_frees_the_name(tmp_path, capsys):
    """One unreadable case file at close: the record is ``incomplete`` (a case is missing), the bad
    file is kept in NAME.unmerged/, and nothing left behind blocks the next run to NAME."""
    path = tmp_path / "m.h5"
    w = make_writer(path)
    for i in range(2):
        w.write_case(f"c00{i}", CASE_ATTRS, case_data())
    bad = sorted((tmp_path / "m.h5.tmp.d").glob("*.h5"))[0]
    bad.write_bytes(bad.read_bytes()[:200])
    w.close()
    meta, rows = read_cases(str(path))
    assert meta["status"] == "incomplete" and [r["id"] for r in rows] == ["c001"]
    assert (tmp_path / "m.h5.unmerged" / bad.name).is_file() and "not merged" in capsys.readouterr().err
    make_writer(path).close()                                   # the name is free again


def test_close_with_failed_status(tmp_path):
    path = tmp_path / "run.h5"
    w = make_writer(path)
    w.close(status="failed")
    meta, rows = read_cases(str(path))
    assert meta["status"] == "failed" and rows == []


def test_read_cases_decodes_attrs(tmp_path):
    path = tmp_path / "run.h5"
    w = make_writer(path)
    w.write_case("c000", CASE_ATTRS, case_data())
    w.write_case("c001", dict(CASE_ATTRS, passed=False, median_s=2.5), {})
    w.close()
    meta, rows = read_cases(str(path))
    assert meta["status"] == "complete"
    assert meta["world_size"] == 2 and isinstance(meta["world_size"], int)
    assert meta["versions"] == {"torch": "2.x", "mpi4py": "4"}      # json-decoded dict
    assert meta["ranks_list"] == [0, 1]                               # json-decoded list
    assert meta["note"] is None                                       # None round-trips
    assert meta["check"] is True
    assert meta["schema_version"] == SCHEMA_VERSION
    assert [r["id"] for r in rows] == ["c000", "c001"]
    r0, r1 = rows
    assert r0["file"] == str(path)
    assert r0["method"] == "tree" and r0["variant"] == "allgather/flat"
    assert r0["shape"] == {"batch": 1, "context": 8}
    assert r0["phases"] == ["compute", "comm"]
    assert r0["median_s"] == pytest.approx(0.0015) and isinstance(r0["median_s"], float)
    assert r0["passed"] is True and r1["passed"] is False
    assert r0["error"] is None
    assert r1["median_s"] == 2.5
    # the raw attribute really is JSON text in the file
    with h5py.File(path, "r") as f:
        assert json.loads(f["cases/c000"].attrs["shape"]) == {"batch": 1, "context": 8}


def test_read_cases_rejects_non_hpcattn_files(tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("x", data=np.arange(3))
    with pytest.raises(InputError, match="not an hpcattn record"):
        read_cases(str(other))
    # a /cases group without schema_version is not enough
    with h5py.File(other, "w") as f:
        f.create_group("cases")
    with pytest.raises(InputError, match="not an hpcattn record"):
        read_cases(str(other))
    text = tmp_path / "text.h5"
    text.write_text("not hdf5 at all")
    with pytest.raises(InputError, match="cannot open as HDF5"):
        read_cases(str(text))
    with pytest.raises(InputError):
        read_cases(str(tmp_path / "missing.h5"))


# ------------------------------------------------------------------------------------------------
# input files


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_input_file_round_trip(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    B, Sq, N, Hq, Hkv, d = 2, 1, 11, 4, 2, 8
    q = torch.randn(B, Sq, Hq, d, generator=g).to(dtype)
    k = torch.randn(B, N, Hkv, d, generator=g).to(dtype)
    v = torch.randn(B, N, Hkv, d, generator=g).to(dtype)
    path = tmp_path / "in.h5"
    write_input_file(str(path), q, k, v, lengths=[11, 4])

    with h5py.File(path, "r") as f:
        if dtype == torch.bfloat16:
            assert f["k"].dtype == np.uint16
            assert f["k"].attrs["dtype_original"] == "bfloat16"
        else:
            assert f["k"].dtype == np.float32
            assert "dtype_original" not in f["k"].attrs

    assert file_shape(str(path)) == {"batch": B, "q_len": Sq, "heads_q": Hq, "heads_kv": Hkv,
                                     "head_dim": d, "context": N, "lengths": [11, 4]}

    # full read, bit-exact in the original dtype
    for name, t in (("q", q), ("k", k), ("v", v)):
        got = read_tokens(str(path), name, torch.arange(t.shape[1]), dtype=dtype, device="cpu")
        assert got.dtype == dtype and torch.equal(got, t)
    # contiguous slice, scattered (sorted) indices, and the empty selection
    got = read_tokens(str(path), "k", torch.arange(3, 7), dtype=dtype, device="cpu")
    assert torch.equal(got, k[:, 3:7])
    idx = torch.tensor([0, 2, 5, 10])
    got = read_tokens(str(path), "v", idx, dtype=dtype, device="cpu")
    assert torch.equal(got, v[:, idx])
    got = read_tokens(str(path), "v", torch.arange(0), dtype=dtype, device="cpu")
    assert got.shape == (B, 0, Hkv, d)
    # conversion to another dtype on read
    got = read_tokens(str(path), "k", torch.arange(N), dtype=torch.float64, device="cpu")
    assert got.dtype == torch.float64 and torch.equal(got, k.double())


def test_input_file_without_lengths(tmp_path):
    q = torch.randn(1, 4, 2, 8)
    k = torch.randn(1, 4, 2, 8)
    path = tmp_path / "in.h5"
    write_input_file(str(path), q, k, k.clone())
    assert file_shape(str(path))["lengths"] is None


@pytest.mark.parametrize("missing", ["q", "k", "v"])
def test_file_shape_missing_dataset(tmp_path, missing):
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        for name in ("q", "k", "v"):
            if name != missing:
                f.create_dataset(name, data=np.zeros((1, 4, 2, 8), np.float32))
    with pytest.raises(InputError) as e:
        file_shape(str(path))
    assert f"no dataset '{missing}'" in str(e.value) and str(path) in str(e.value)


def _write_qkv(path, q, k, v):
    """An input file with zero q, k, v of the given shapes."""
    with h5py.File(path, "w") as f:
        for name, shape in (("q", q), ("k", k), ("v", v)):
            f.create_dataset(name, data=np.zeros(shape, np.float32))


def test_file_shape_other_errors(tmp_path):
    path = tmp_path / "bad.h5"
    _write_qkv(path, (1, 4, 2), (1, 4, 2, 8), (1, 4, 2, 8))
    with pytest.raises(InputError, match="expected 4 dims"):
        file_shape(str(path))
    _write_qkv(path, (1, 1, 2, 8), (1, 4, 2, 8), (1, 5, 2, 8))
    with pytest.raises(InputError, match="differ in shape"):
        file_shape(str(path))
    _write_qkv(path, (2, 1, 2, 8), (1, 4, 2, 8), (1, 4, 2, 8))
    with pytest.raises(InputError, match="batch or head_dim"):
        file_shape(str(path))
    with pytest.raises(InputError, match="cannot open"):
        file_shape(str(tmp_path / "missing.h5"))

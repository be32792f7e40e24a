"""The model runner on real ranks equals one process (float64 tiny model), and the generate job
through the CLI (ring prefill + tree/ring decode) records agreeing tokens."""

import pytest

from hpcattn.results.hdf5 import read_cases
from tests.mpirun import run_ranks

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("ranks,backend", [(2, "mpi"), (3, "mpi"), (4, "gloo")])
def test_generate_matches_one_process(ranks, backend):
    r = run_ranks(ranks, ["-m", "mpi4py", "tests/mpi_progs/check_generate.py", backend])
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"matched one process on {ranks} ranks" in r.stdout


@pytest.mark.parametrize("ranks", [2, 3])
def test_star_apb_in_the_model(ranks):
    r = run_ranks(ranks, ["-m", "mpi4py", "tests/mpi_progs/check_generate_approx.py"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"passed on {ranks} ranks" in r.stdout


def test_generate_job_star_apb_cli(tmp_path):
    out = tmp_path / "g.h5"
    r = run_ranks(2, ["-m", "hpcattn", "run", "configs/generate.yaml", "--set", "generate.prefill=[star,apb]",
                      "--set", "generate.decode=tree", "--set", "generate.query_len=8", "--set", "context=264",
                      "--set", "run.repeats=1", "-o", str(out)])
    assert r.returncode == 0, r.stdout + r.stderr
    meta, rows = read_cases(str(out))
    assert [row["method"] for row in rows] == ["star+tree", "apb+tree"]
    for row in rows:
        assert 0 <= row["token_agreement"] <= 1 and row["logits_rel_err"] >= 0


def test_generate_job_cli(tmp_path):
    out = tmp_path / "g.h5"
    r = run_ranks(2, ["-m", "hpcattn", "run", "configs/generate.yaml", "--set", "shape.dtype=float64",
                      "--set", "run.repeats=2", "-o", str(out)])
    assert r.returncode == 0, r.stdout + r.stderr
    meta, rows = read_cases(str(out))
    assert {row["method"] for row in rows} == {"ring+tree", "ring+ring"}
    for row in rows:
        assert row["check_passed"] and row["token_agreement"] == 1.0 and row["logits_rel_err"] < 1e-9
        assert row["throughput_tok_s"] > 0 and row["prefill_median_s"] > 0 and row["decode_step_median_s"] > 0


def test_generate_bad_combination(tmp_path):
    r = run_ranks(2, ["-m", "hpcattn", "run", "configs/generate.yaml", "--set", "generate.decode=local"], timeout=60)
    assert r.returncode == 2 and "generate.decode=local needs generate.prefill=local" in r.stderr

"""Star and APB on real ranks (2, 3, 4) equal their single-process explicit-mask simulations
(float64), for the query-aware, random and retaining-heads compressors and the ablation switches."""

import pytest
import torch

from tests.mpirun import run_ranks

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module")
def heads_file(tmp_path_factory):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("heads") / "heads.safetensors"
    save_file({"model.layers.0.fc1.weight": torch.randn(32, 12 * 16, generator=g, dtype=torch.float64) * 0.1,
               "model.layers.0.fc2.weight": torch.randn(2, 32, generator=g, dtype=torch.float64) * 0.1}, str(path))
    return str(path)


@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_star_and_apb_equal_simulation(ranks, heads_file):
    r = run_ranks(ranks, ["-m", "mpi4py", "tests/mpi_progs/check_approx.py", heads_file])
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"checks passed on {ranks} ranks" in r.stdout

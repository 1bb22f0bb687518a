"""`mpirun -n 2 python launcher/run.py` (MPICH from pip) trains the demo: ranks come from the
PMI variables, the rendezvous address and port from rank 0 through mpi4py."""

import json

import pytest

from demo_runs import STEPS, reference
from longctx.launcher.discovery import DiscoveryError, World, discover, from_environment


@pytest.mark.parametrize("env, expected", [
    ({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "8", "MASTER_ADDR": "n1", "MASTER_PORT": "29500"},
     World(5, 16, 1, "n1", 29500, "openmpi", 8)),
    ({"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "3", "MPI_LOCALNRANKS": "4"},
     World(3, 4, 3, None, None, "pmi", 4)),
    ({"PMIX_RANK": "2", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2", "SLURM_PROCID": "2"},
     World(2, 8, 2, None, None, "pmix")),
    ({"PMI_RANK": "1", "PMI_SIZE": "2"}, World(1, 2, -1, None, None, "pmi")),  # local rank: ask MPI
])
def test_mpi_variables_map_to_a_world(env, expected):
    assert from_environment(env) == expected


def test_torch_launcher_variables_win_and_must_be_complete():
    full = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1234",
            "PMI_RANK": "0", "PMI_SIZE": "2"}
    assert discover(dict(full)).source == "torch"
    with pytest.raises(DiscoveryError, match="RANK is set but not MASTER_ADDR, MASTER_PORT"):
        discover({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    with pytest.raises(DiscoveryError, match="rank 4 is outside a world of 4"):
        from_environment({"PMI_RANK": "4", "PMI_SIZE": "4"})
    assert discover({"PATH": "/bin"}) is None  # no launcher: the caller runs a world of one


@pytest.fixture(scope="module")
def mpi_run(tmp_path_factory):
    pytest.importorskip("mpi4py", reason="the mpi extra: pip install 'longctx[mpi]' mpich")
    return reference(tmp_path_factory.getbasetemp())


@pytest.mark.slow
def test_mpirun_two_ranks_train_the_demo_as_one_world(mpi_run):
    out, rows = mpi_run
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows[-1]["tokens"] == STEPS * 2 * 256  # two data-parallel ranks, one 256-token window each
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert json.loads((out / "run.json").read_text())["world"] == 2
    assert (out / "checkpoints" / f"step-{STEPS:07d}" / "COMPLETE").exists()

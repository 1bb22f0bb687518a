"""Who am I in the job? Rank variables for processes started by srun or mpirun.

`torch.distributed` reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; the
`deepspeed` launcher and torchrun set them, SLURM and MPI launchers set their own. This
module translates before the process group starts, and also sets LOCAL_WORLD_SIZE (ranks on
this node), which the memory planner needs to tell nodes apart:

    already set (deepspeed, torchrun)   left alone
    srun (one task per GPU)             SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID,
                                        SLURM_STEP_TASKS_PER_NODE at SLURM_NODEID;
                                        master = first host of SLURM_JOB_NODELIST,
                                        port derived from SLURM_JOB_ID (every task agrees)
    mpirun: Open MPI                    OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK / _LOCAL_SIZE
    mpirun: MPICH, Intel MPI (Hydra)    PMI_RANK / PMI_SIZE / MPI_LOCALRANKID / MPI_LOCALNRANKS
    PMIx (srun --mpi=pmix, prterun)     PMIX_RANK, sizes from the launcher's variables
    MPI without a master address        mpi4py: rank 0 broadcasts its host name and a free port

Nothing here imports torch, so discovery is cheap and runs before any heavy import.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping, Optional

TORCH_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# SLURM jobs agree on a port without talking: a fixed range offset by the job id, so two jobs
# sharing a node rarely collide. MASTER_PORT in the environment wins.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 20000


class DiscoveryError(RuntimeError):
    """The launcher's variables do not describe a complete world."""


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    master_addr: Optional[str]  # None: ask MPI (rank 0's host)
    master_port: Optional[int]
    source: str  # which launcher's variables were read, for the log
    local_size: int = -1  # ranks on this node; -1: not said

    def as_env(self) -> dict[str, str]:
        env = {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "MASTER_ADDR": str(self.master_addr),
            "MASTER_PORT": str(self.master_port),
        }
        if self.local_size > 0:
            env["LOCAL_WORLD_SIZE"] = str(self.local_size)
        return env


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[03-05,9],cpu1' -> 'gpu03' (no scontrol needed)."""
    first = re.match(r"([^,\[]*(\[[^\]]*\][^,\[]*)*)", nodelist.strip()).group(0)
    # every bracket expression becomes its first value; zero padding is part of the name
    host = re.sub(r"\[([^\]\-,]+)[^\]]*\]", r"\1", first)
    if not host:
        raise DiscoveryError(f"SLURM_JOB_NODELIST={nodelist!r}: no host in it")
    return host


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise DiscoveryError(f"{key}={env[key]!r}: not an integer") from None


def _first_int(env: Mapping[str, str], keys: tuple[str, ...]) -> Optional[int]:
    for key in keys:
        if key in env:
            return _int(env, key)
    return None


def _master(env: Mapping[str, str]) -> tuple[Optional[str], Optional[int]]:
    port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else None
    return env.get("MASTER_ADDR"), port


def slurm_tasks_on_node(env: Mapping[str, str]) -> Optional[int]:
    """Tasks of this srun step on this node: SLURM_STEP_TASKS_PER_NODE ('8(x4)' or '2(x2),1') at SLURM_NODEID."""
    spec, node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE"), env.get("SLURM_NODEID")
    if spec is None or node is None:
        return None
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            raise DiscoveryError(f"SLURM_STEP_TASKS_PER_NODE={spec!r}: not a tasks-per-node list")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    index = _int(env, "SLURM_NODEID")
    if not 0 <= index < len(counts):
        raise DiscoveryError(f"SLURM_NODEID={index}: outside the {len(counts)} nodes of SLURM_STEP_TASKS_PER_NODE")
    return counts[index]


def _from_mpi_variables(env: Mapping[str, str]) -> Optional[World]:
    for source, rank_key, size_keys, local_keys, local_size_keys in (
        ("openmpi", "OMPI_COMM_WORLD_RANK", ("OMPI_COMM_WORLD_SIZE",), ("OMPI_COMM_WORLD_LOCAL_RANK",),
         ("OMPI_COMM_WORLD_LOCAL_SIZE",)),
        ("pmi", "PMI_RANK", ("PMI_SIZE",), ("MPI_LOCALRANKID", "PMI_LOCAL_RANK"), ("MPI_LOCALNRANKS",)),
        ("pmix", "PMIX_RANK", ("PMIX_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS"),
         ("PMIX_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID"),
         ("PMIX_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE")),
    ):
        if rank_key in env:
            size = _first_int(env, size_keys)
            if size is None:
                raise DiscoveryError(f"{rank_key} is set but none of {', '.join(size_keys)}: world size unknown")
            local = _first_int(env, local_keys)
            local_size = _first_int(env, local_size_keys) or slurm_tasks_on_node(env)
            addr, port = _master(env)
            return World(_int(env, rank_key), size, -1 if local is None else local, addr, port, source,
                         local_size or -1)
    return None


def _from_slurm(env: Mapping[str, str]) -> Optional[World]:
    # SLURM_STEP_NUM_TASKS exists only inside an srun step: the batch script itself (rank 0
    # of nothing) must not take SLURM_PROCID=0 for a world it is not part of.
    if "SLURM_PROCID" not in env or "SLURM_STEP_NUM_TASKS" not in env:
        return None
    addr, port = _master(env)
    if addr is None:
        if "SLURM_JOB_NODELIST" not in env:
            raise DiscoveryError("SLURM_PROCID is set but neither MASTER_ADDR nor SLURM_JOB_NODELIST")
        addr = first_host(env["SLURM_JOB_NODELIST"])
    if port is None:
        port = SLURM_PORT_BASE + _int(env, "SLURM_JOB_ID") % SLURM_PORT_SPAN if "SLURM_JOB_ID" in env else None
    if port is None:
        raise DiscoveryError("SLURM_PROCID is set but neither MASTER_PORT nor SLURM_JOB_ID")
    local = _first_int(env, ("SLURM_LOCALID",))
    return World(_int(env, "SLURM_PROCID"), _int(env, "SLURM_STEP_NUM_TASKS"), 0 if local is None else local,
                 addr, port, "slurm", slurm_tasks_on_node(env) or -1)


def from_environment(env: Mapping[str, str]) -> Optional[World]:
    """The world the launcher's variables describe; None when no launcher set any.

    MPI variables are read before SLURM's: `srun --mpi=pmix` sets both, and they agree.
    A World may still lack master_addr/port or local_rank (MPI without them): `complete` fills those.
    """
    if "RANK" in env:  # a torch launcher ran us: it sets all of them
        missing = [key for key in TORCH_KEYS if key not in env]
        if missing:
            raise DiscoveryError(f"RANK is set but not {', '.join(missing)}")
        return World(_int(env, "RANK"), _int(env, "WORLD_SIZE"), _int(env, "LOCAL_RANK"), env["MASTER_ADDR"],
                     _int(env, "MASTER_PORT"), "torch")
    world = _from_mpi_variables(env) or _from_slurm(env)
    if world is not None and not 0 <= world.rank < world.world_size:
        raise DiscoveryError(f"{world.source}: rank {world.rank} is outside a world of {world.world_size}")
    return world


def check_master_port() -> None:
    """Rank 0 binds the rendezvous store at MASTER_PORT: a port another process listens on would leave this job
    waiting for peers that never come, so it is refused at once."""
    if os.environ.get("RANK", "0") != "0" or "MASTER_PORT" not in os.environ:
        return
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # torchrun's agent already listens there for us
        return
    port = int(os.environ["MASTER_PORT"])
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the store binds: a closing run's port is free
        try:
            s.bind(("", port))
        except OSError:
            raise DiscoveryError(f"MASTER_PORT={port}: another process (another run?) listens on it; "
                                 f"start with a free port: deepspeed --master_port N ..., or MASTER_PORT=N") from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def complete_with_mpi(world: Optional[World]) -> World:
    """Fill what the variables lacked (or everything, under an MPI launcher that sets none) from mpi4py.

    Rank 0 broadcasts its host name and a port it found free; the local rank is the rank among
    processes that share memory with this one.
    """
    try:
        from mpi4py import MPI
    except ImportError:
        raise DiscoveryError(
            "no master address in the environment and mpi4py is not installed: "
            "pip install 'longctx[mpi]', or set MASTER_ADDR and MASTER_PORT"
        ) from None
    comm = MPI.COMM_WORLD
    if world is not None and (comm.Get_rank(), comm.Get_size()) != (world.rank, world.world_size):
        raise DiscoveryError(
            f"{world.source} says rank {world.rank} of {world.world_size}, MPI says {comm.Get_rank()} of {comm.Get_size()}"
        )
    addr, port = (world.master_addr, world.master_port) if world is not None else (None, None)
    if addr is None or port is None:
        addr, port = comm.bcast((addr or socket.gethostname(), port or free_port()) if comm.Get_rank() == 0 else None)
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)  # the processes that share this node's memory
    local = world.local_rank if world is not None and world.local_rank >= 0 else node.Get_rank()
    local_size = world.local_size if world is not None and world.local_size > 0 else node.Get_size()
    return World(comm.Get_rank(), comm.Get_size(), local, addr, port, world.source if world else "mpi4py", local_size)


def under_mpi_launcher(env: Mapping[str, str]) -> bool:
    """Started by mpirun/mpiexec even if it set no rank variable we know (then mpi4py knows)."""
    return any(key.startswith(("OMPI_", "PMI_", "PMIX_", "HYDRA_", "I_MPI_")) for key in env)


def discover(env: Optional[dict] = None) -> Optional[World]:
    """Set the torch variables in `env` (default os.environ) from the launcher's; returns the World.

    None when no launcher is recognised: the caller runs a world of one.
    """
    env = os.environ if env is None else env
    world = from_environment(env)
    if world is None and not under_mpi_launcher(env):
        return None
    if world is None or world.master_addr is None or world.master_port is None or world.local_rank < 0:
        world = complete_with_mpi(world)
    env.update(world.as_env())
    return world

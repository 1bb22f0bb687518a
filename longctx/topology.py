"""Process groups: world = dp x sp, the one place where distributed state lives.

Ranks of one sequence-parallel group are contiguous (rank = dp_rank * sp + sp_rank), so with
ranks numbered node by node they share a node and its fast links; data parallelism spans
nodes. With sp > 1 the groups are DeepSpeed's own (`parallel_state_sp`, which lays ranks out
the same way): its engine reads them through `mpu` to partition ZeRO state over all dp x sp
ranks and to reduce gradients over them averaging by dp only, so the gradients of one
sequence are summed over its sp ranks.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

log = logging.getLogger(__name__)


@dataclass
class Topology:
    rank: int
    world_size: int
    local_rank: int
    sp_size: int
    device: torch.device
    sp_group: object = None  # the ranks that share this rank's sequences; None while sp == 1

    @property
    def dp_size(self) -> int:
        return self.world_size // self.sp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp_size

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp_size

    def all_reduce_world(self, tensor: torch.Tensor) -> None:
        """Sum over every rank: each holds distinct tokens (other sequences across dp, other shards across sp)."""
        dist.all_reduce(tensor)

    def mpu(self) -> ModuleType | None:
        """DeepSpeed's sequence-parallel state for its engine; None while every rank is data parallel."""
        if self.sp_size == 1:
            return None
        from deepspeed.runtime.sequence_parallel import parallel_state_sp

        return parallel_state_sp


def nodes_per_sp_group(local_ranks: list[int], sp: int) -> int:
    """How many nodes the widest sp group touches, from every rank's LOCAL_RANK in rank order.

    A node starts where LOCAL_RANK is 0, which holds for every launcher that numbers ranks node
    by node (deepspeed, torchrun, srun, mpirun), even when the "nodes" share one host.
    """
    node_of, node = [], -1
    for local_rank in local_ranks:
        node += local_rank == 0
        node_of.append(node)
    return max(len(set(node_of[g : g + sp])) for g in range(0, len(node_of), sp))


def _unlink_shared_memory(rank: int) -> None:
    """DeepSpeed's CPU all-reduce gives each rank of a single-host job a 64 MiB shared-memory file
    and never removes it, so every run would leave them in /dev/shm. init_distributed maps every
    rank's file; after a barrier each rank removes its own name (the mappings live on)."""
    dist.barrier()
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    if os.path.exists(name):
        os.unlink(name)


def warn_on_build_locks(after_s: float = 10.0) -> threading.Timer:
    """torch waits without a word on the lock of an op build; a build killed mid-way leaves its lock behind for
    good. If start-up still waits after `after_s`, name every such lock and how to clear it (cancel the timer
    once started)."""

    def say() -> None:
        root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
        for lock in sorted(root.glob("**/lock")):
            print(f"[rank{os.environ.get('RANK', '0')}] still waiting after {after_s:.0f} s: an op build holds "
                  f"{lock}. If no other run on this machine is building it, a killed build left it: rm {lock}",
                  file=sys.stderr, flush=True)

    timer = threading.Timer(after_s, say)
    timer.daemon = True
    timer.start()
    return timer


def init_topology(sp: int, timeout_s: int = 1800) -> Topology:
    """Start the process group (DeepSpeed's comm backend: NCCL on GPUs, gloo on CPU) and the sp groups; a
    collective that waits longer than `timeout_s` for a rank raises instead of waiting for ever."""
    from datetime import timedelta

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    # On CPU, DeepSpeed builds (or loads) its shared-memory all-reduce op here and prints a line each run
    watchdog = warn_on_build_locks()
    with contextlib.redirect_stdout(io.StringIO()):
        deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(), auto_mpi_discovery=False,
                                   timeout=timedelta(seconds=timeout_s))
    watchdog.cancel()
    # DeepSpeed makes groups of its own (a clone of the world for data parallelism, the sp groups) without a
    # timeout, and torch gives such a group its module default (30 min), not the world's: make that default ours
    distributed_c10d.default_pg_timeout = distributed_c10d.default_pg_nccl_timeout = timedelta(seconds=timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    if accelerator.device_name() == "cpu":
        _unlink_shared_memory(rank)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if world % sp:
        raise ValueError(f"parallel.sp={sp}: must divide the world size {world}")
    if accelerator.device_name() == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    topo = Topology(rank=rank, world_size=world, local_rank=local_rank, sp_size=sp, device=device)
    if sp > 1:
        from deepspeed.runtime.sequence_parallel import parallel_state_sp

        parallel_state_sp.initialize_sequence_parallel(sp)  # every rank builds every group, in one order
        topo.sp_group = parallel_state_sp.get_sequence_parallel_group()
        local_ranks: list = [None] * world
        dist.all_gather_object(local_ranks, local_rank)
        nodes = nodes_per_sp_group(local_ranks, sp)
        where = "within one node" if nodes == 1 else f"spanning {nodes} nodes (its all-to-all crosses the network)"
        log.info("sequence parallel: dp=%d x sp=%d, each sp group of consecutive ranks %s", world // sp, sp, where)
    return topo

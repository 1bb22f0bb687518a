"""Process groups: world = dp x sp, the one place where distributed state lives.

Ranks of one sequence-parallel group are contiguous (rank = dp_rank * sp + sp_rank), so with
ranks numbered node by node they share a node and its fast links; data parallelism spans
nodes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Topology:
    rank: int
    world_size: int
    local_rank: int
    sp_size: int
    device: torch.device
    dp_group: object = None  # None = the whole world (sp == 1)

    @property
    def dp_size(self) -> int:
        return self.world_size // self.sp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp_size

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp_size

    def all_reduce_dp(self, tensor: torch.Tensor) -> None:
        dist.all_reduce(tensor, group=self.dp_group)

    def mpu(self):
        """What DeepSpeed needs to reduce over dp only; None while every rank is data parallel."""
        return None


def init_topology(sp: int) -> Topology:
    """Start the process group (DeepSpeed's comm backend: NCCL on GPUs, gloo on CPU)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(), auto_mpi_discovery=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if world % sp:
        raise ValueError(f"parallel.sp={sp}: must divide the world size {world}")
    if accelerator.device_name() == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return Topology(rank=rank, world_size=world, local_rank=local_rank, sp_size=sp, device=device)

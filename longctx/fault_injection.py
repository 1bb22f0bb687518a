"""Faults on purpose, for the drills of `tests/test_drills.py`: each way a long run dies, made to happen at a
chosen point of a chosen step on a chosen rank.

    LONGCTX_FAULT=<fault>:<point>:<step>[:<rank>][,...]        e.g. kill:checkpoint-rng:4:0

Faults: `kill` (SIGKILL this rank), `exit` (this rank dies with status 1), `hang` (this rank sleeps for good),
`usr1` (SIGUSR1 to this rank, as SLURM's warning), `oom` (torch.OutOfMemoryError, as a GPU raises it), and the
value faults `nan` (the point's value becomes NaN) and `inf` (+Inf). Points are named where the run calls
`inject`. Without the variable, `inject` does nothing.
"""

from __future__ import annotations

import os
import signal
import time

import torch

VARIABLE = "LONGCTX_FAULT"
VALUES = {"nan": float("nan"), "inf": float("inf")}


def _planned(point: str, step: int, rank: int) -> str | None:
    for spec in filter(None, os.environ.get(VARIABLE, "").split(",")):
        fault, where, at, *who = spec.split(":")
        if where == point and int(at) == step and (not who or int(who[0]) == rank):
            return fault
    return None


def inject(point: str, step: int, rank: int) -> float:
    """Carry out the fault planned here, if any; returns the factor a value at this point is multiplied by
    (NaN or Inf for a value fault, else 1)."""
    fault = _planned(point, step, rank)
    if fault is None:
        return 1.0
    if fault == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault == "exit":
        os._exit(1)  # no clean-up, no message: as a rank the kernel's OOM killer or a hardware fault ends
    elif fault == "hang":
        while True:
            time.sleep(3600)
    elif fault == "usr1":
        os.kill(os.getpid(), signal.SIGUSR1)
    elif fault == "oom":
        raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB (injected by {VARIABLE})")
    elif fault in VALUES:
        return VALUES[fault]
    else:
        raise ValueError(f"{VARIABLE}: unknown fault {fault!r}")
    return 1.0

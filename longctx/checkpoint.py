"""Checkpoints that are either complete or ignored.

DeepSpeed writes the model, optimizer and scheduler states of a tag; we add each rank's RNG
state and, only after every rank has finished, a COMPLETE marker and an atomically replaced
`latest` file. A crash mid-write leaves a tag without the marker, which resume skips.
"""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from longctx.config import ConfigError, Recipe

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

MARKER = "COMPLETE"
IDENTITY = "identity.json"
# what a checkpoint shares with the run that resumes it: the weights' source and shape, and what a step computes
IDENTITY_KEYS = ("model.path", "model.config", "model.dtype", "data.seq_len", "parallel.sp", "parallel.zero_stage",
                 "lora.enabled")
LORA_KEYS = ("lora.r", "lora.targets", "lora.train_embeddings", "lora.train_norms")


def tag_for(step: int) -> str:
    return f"step-{step:07d}"


def complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / MARKER).exists())


def identity(recipe: Recipe, rope: dict) -> dict[str, Any]:
    """The recipe values (and the effective RoPE record) a resumed run must share with its checkpoint."""
    keys = IDENTITY_KEYS + (LORA_KEYS if recipe.lora.enabled else ())
    values = {k: functools.reduce(getattr, k.split("."), recipe) for k in keys}
    for k in ("model.path", "model.config"):
        values[k] = values[k] and os.path.abspath(values[k])
    return json.loads(json.dumps({**values, "rope": rope}))  # as it reads back from the checkpoint


def check_resumable(path: Path, world_size: int, expected: dict[str, Any]) -> None:
    """A checkpoint resumes only in a world of the size that wrote it (ZeRO partitions and per-rank RNG state),
    and only into the run that wrote it: same model, LoRA shape, sequence length, sp, ZeRO stage and RoPE."""
    written = len(list(path.glob("rng-rank*.pt")))
    if written != world_size:
        raise ConfigError(f"train.resume: {path} was written by {written} ranks, this run has {world_size}; "
                          f"resume with {written} ranks, or set train.resume=never")
    how = "resume with the same value, or start anew in another train.out_dir (or train.resume=never)"
    if not (path / IDENTITY).is_file():
        raise ConfigError(f"train.resume: {path} does not record the recipe that wrote it, so it cannot be checked; {how}")
    saved = _flat(json.loads((path / IDENTITY).read_text()))
    expected = _flat(expected)
    for key in dict.fromkeys([*saved, *expected]):
        if saved.get(key) != expected.get(key):
            raise ConfigError(f"train.resume: {path} was written with {key}={saved.get(key)!r}, this run has "
                              f"{key}={expected.get(key)!r}; {how}")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def resolve_resume(resume: str, root: Path) -> Path | None:
    """The checkpoint to resume from: newest complete one (auto), none (never), or a given one."""
    if resume == "never":
        return None
    if resume == "auto":
        found = complete_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / MARKER).exists():
        raise ConfigError(f"train.resume={resume!r}: not a complete checkpoint (no {MARKER} file in it); "
                          f"allowed: auto, never, or a checkpoint directory such as <out_dir>/checkpoints/{tag_for(1)}")
    return path


def saved_step(path: Path) -> int:
    """The optimizer step a complete checkpoint was written after."""
    return json.loads((path / MARKER).read_text())["step"]


def _rng_state() -> dict:
    """Every RNG's state as tensors and plain values, so that it loads with torch.load(weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine: DeepSpeedEngine, root: Path, step: int, client_state: dict, keep: int,
         run_identity: dict[str, Any]) -> Path:
    """Write the checkpoint of `step` on every rank, with the `identity` of the run; returns its directory."""
    tag = tag_for(step)
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    rank = dist.get_rank()
    torch.save(_rng_state(), root / tag / f"rng-rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        (root / tag / IDENTITY).write_text(json.dumps(run_identity, indent=1))
        (root / tag / MARKER).write_text(json.dumps(client_state))
        tmp = root / "latest.tmp"
        tmp.write_text(tag)
        os.replace(tmp, root / "latest")
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for left in root.glob("step-*"):  # tags a crash left unfinished before this one: never resumed
            if left.is_dir() and left.name < tag and not (left / MARKER).exists():
                shutil.rmtree(left, ignore_errors=True)
    dist.barrier()
    return root / tag


def load(engine: DeepSpeedEngine, path: Path) -> dict:
    """Restore engine states and this rank's RNG; returns the client state saved with them."""
    _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name)
    _set_rng_state(torch.load(path / f"rng-rank{dist.get_rank()}.pt", weights_only=True))
    return client_state

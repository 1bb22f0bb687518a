"""Checkpoints that are either complete or ignored.

DeepSpeed writes the model, optimizer and scheduler states of a tag; we add each rank's RNG
state and, only after every rank has finished, a COMPLETE marker and an atomically replaced
`latest` file. A crash mid-write leaves a tag without the marker, which resume skips. The
marker records every file's size and CRC-32: a resume checks them and refuses, naming the file,
a checkpoint whose bytes changed since (torch.load would read flipped tensor bytes silently).

Frozen weights (a LoRA run's base model) are not written: the resumed run rebuilds them from the same
model.path, or the same model.config and train.seed, which the checkpoint's identity holds it to. A 70B base
in 4 bits is 37 GB a checkpoint that training never changes (bitsandbytes still adds its scales, 3% of that, to
the state dict beside each weight).
"""

from __future__ import annotations

import errno
import functools
import json
import os
import random
import shutil
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from longctx.config import ConfigError, Recipe, flatten
from longctx.fault_injection import inject

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

MARKER = "COMPLETE"
IDENTITY = "identity.json"
# what a checkpoint shares with the run that resumes it: the weights' source and shape, and what a step computes
IDENTITY_KEYS = ("model.path", "model.config", "model.dtype", "model.quantize", "data.seq_len", "parallel.sp",
                 "parallel.zero_stage", "lora.enabled")
LORA_KEYS = ("lora.r", "lora.targets", "lora.train_embeddings", "lora.train_norms")
RANDOM_BASE_KEYS = ("train.seed",)  # a LoRA run's frozen base built from model.config comes from the seed


def tag_for(step: int) -> str:
    return f"step-{step:07d}"


def complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / MARKER).exists())


def identity(recipe: Recipe, rope: dict) -> dict[str, Any]:
    """The recipe values (and the effective RoPE record) a resumed run must share with its checkpoint."""
    keys = IDENTITY_KEYS + (LORA_KEYS if recipe.lora.enabled else ()) + (
        RANDOM_BASE_KEYS if recipe.lora.enabled and not recipe.model.path else ())
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
    saved = flatten(json.loads((path / IDENTITY).read_text()))
    expected = flatten(expected)
    for key in dict.fromkeys([*saved, *expected]):
        if saved.get(key) != expected.get(key):
            raise ConfigError(f"train.resume: {path} was written with {key}={saved.get(key)!r}, this run has "
                              f"{key}={expected.get(key)!r}; {how}")


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


class DiskFull(RuntimeError):
    """A checkpoint did not fit on its filesystem; the message is one line for the user."""


def _files_of(tag_dir: Path) -> list[Path]:
    return sorted(p for p in tag_dir.iterdir() if p.is_file() and p.name != MARKER)


def _crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while block := f.read(1 << 24):
            crc = zlib.crc32(block, crc)
    return crc


def _my_share(files: list[Path]) -> list[Path]:
    """This rank's part of a checkpoint's files, so that checksumming one costs each rank 1/world of it."""
    return files[dist.get_rank()::dist.get_world_size()]


def _gathered(mine: Any) -> list[Any]:
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return every


def _manifest(tag_dir: Path) -> dict[str, list[int]]:
    """Size and CRC-32 of every file of a written tag: torch.load reads a flipped byte of tensor data silently."""
    parts = _gathered({p.name: [p.stat().st_size, _crc32(p)] for p in _my_share(_files_of(tag_dir))})
    return {name: entry for part in parts for name, entry in sorted(part.items())}


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _disk_full(tag_dir: Path, root: Path) -> DiskFull:
    """The line for a write that failed for want of space; the partial tag goes, to give back what it took."""
    written = _tree_bytes(tag_dir) if tag_dir.is_dir() else 0
    shutil.rmtree(tag_dir, ignore_errors=True)
    previous = complete_checkpoints(root)
    needed = f"about {_tree_bytes(previous[-1]):,} bytes (the size of {previous[-1].name})" if previous else \
        f"more than the {written:,} bytes it had written"
    kept = f"{previous[-1]} is intact" if previous else "no earlier checkpoint exists"
    return DiskFull(f"no space left on the device of {tag_dir}: a checkpoint needs {needed}, "
                    f"{shutil.disk_usage(root).free:,} bytes are free; {kept}; free space and run the same command "
                    f"to resume")


def _first_line(error: BaseException) -> str:
    return (str(error).strip() or type(error).__name__).splitlines()[0]


def save(engine: DeepSpeedEngine, root: Path, step: int, client_state: dict, keep: int,
         run_identity: dict[str, Any]) -> Path:
    """Write the checkpoint of `step` on every rank, with the `identity` of the run; returns its directory.
    Raises DiskFull when its filesystem has no room for it."""
    tag = tag_for(step)
    rank = dist.get_rank()
    if rank == 0 and (root / tag).exists():  # a tag of an abandoned history (a resume from an older one)
        shutil.rmtree(root / tag)
    dist.barrier()
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False,
                               exclude_frozen_parameters=True)
        inject("checkpoint-states", step, rank)
        torch.save(_rng_state(), root / tag / f"rng-rank{rank}.pt")
        inject("checkpoint-rng", step, rank)
    except (OSError, RuntimeError) as e:  # torch.save's failed write is a RuntimeError without an errno
        if shutil.disk_usage(root).free >= (1 << 20) and getattr(e, "errno", None) != errno.ENOSPC:
            raise
        raise _disk_full(root / tag, root) from None
    dist.barrier()
    files = _manifest(root / tag)
    if rank == 0:
        (root / tag / IDENTITY).write_text(json.dumps(run_identity, indent=1))
        files[IDENTITY] = [(root / tag / IDENTITY).stat().st_size, _crc32(root / tag / IDENTITY)]
        _replace_text(root / tag / MARKER, json.dumps({**client_state, "files": files}))
        inject("checkpoint-marker", step, rank)
        _replace_text(root / "latest", tag)
        # the newest `keep` complete ones up to this step stay; newer tags are another history's, left to the user
        for old in [p for p in complete_checkpoints(root) if p.name <= tag][:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for left in root.glob("step-*"):  # tags a crash left unfinished before this one: never resumed
            if left.is_dir() and left.name < tag and not (left / MARKER).exists():
                shutil.rmtree(left, ignore_errors=True)
    dist.barrier()
    return root / tag


def _replace_text(path: Path, text: str) -> None:
    """Write a whole file or none of it: a kill mid-write leaves the old one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def damaged_files(path: Path) -> list[str]:
    """What is wrong with a complete checkpoint's files against the sizes and checksums its marker records,
    one phrase per bad file, checked by every rank for its share (a checkpoint written before the marker
    recorded them passes)."""
    recorded = json.loads((path / MARKER).read_text()).get("files", {})
    names = sorted(recorded)
    mine = []
    for name in names[dist.get_rank()::dist.get_world_size()]:
        size, crc = recorded[name]
        file = path / name
        if not file.is_file():
            mine.append(f"{file} is missing")
        elif file.stat().st_size != size:
            mine.append(f"{file} is cut short ({file.stat().st_size:,} of {size:,} bytes)")
        elif _crc32(file) != crc:
            mine.append(f"{file} is damaged (its checksum differs from the one recorded when it was written)")
    return sorted(bad for part in _gathered(mine) for bad in part)


def _refusal(path: Path, problem: str, resume: str) -> ConfigError:
    how = "; start anew with train.resume=never"
    if resume == "auto":
        older = [p for p in complete_checkpoints(path.parent) if p.name < path.name]
        if older:
            how = f"; to go on from the previous complete checkpoint, run with train.resume={older[-1]}"
    return ConfigError(f"train.resume={resume}: checkpoint {path} does not load: {problem}{how}")


def _load_trained(src: dict[str, torch.Tensor], dst: torch.nn.Module) -> None:
    """Load a checkpoint's module states, which lack the frozen weights, and nothing else: a trained parameter
    or buffer it lacks, or a key the model does not have, fails the load."""
    frozen = {name for name, p in dst.named_parameters() if not p.requires_grad}
    unknown = sorted(set(src) - set(dst.state_dict()))
    missing = sorted(set(dst.load_state_dict(src, strict=False).missing_keys) - frozen)
    if unknown or missing:
        first = f"lack {missing[0]}" if missing else f"hold {unknown[0]}, which the model does not have"
        others = len(missing) + len(unknown) - 1
        raise RuntimeError(f"module states {first}" + (f" (and {others} more)" if others else ""))


def load(engine: DeepSpeedEngine, path: Path, resume: str = "auto") -> dict:
    """Restore engine states and this rank's RNG; returns the client state saved with them. A checkpoint whose
    files are damaged is refused on every rank with the file named; never another one in its place."""
    bad = damaged_files(path)
    if bad:
        raise _refusal(path, bad[0], resume)
    try:
        _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name, custom_load_fn=_load_trained)
        _set_rng_state(torch.load(path / f"rng-rank{dist.get_rank()}.pt", weights_only=True))
    except Exception as e:  # a checkpoint without recorded checksums (older), read by DeepSpeed or torch
        raise _refusal(path, _first_line(e), resume) from None
    return client_state

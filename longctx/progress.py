"""Where each rank is, so that a run that dies in a collective says which rank it waited for.

A collective that fails (a rank died: gloo reads a reset connection at once; a rank hangs: the wait ends after
`parallel.timeout_s`) cannot itself tell which peer is missing. Each rank writes the point it reached into
`<run_dir>/progress/rank<N>` (a few small writes per step); the rank whose collective failed reads them all
and names the ranks that stayed behind.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch.distributed as dist

# the points of a step, in the order a rank passes them
POINTS = ("start", "batch", "forward", "backward", "optimizer step", "metrics", "checkpoint", "export")
# what gloo and NCCL say when a peer is gone or silent; torch raises them as RuntimeError (gloo) or DistError
PEER_LOST = ("Connection reset", "Connection closed", "Broken pipe", "closed by peer")
TIMED_OUT = ("Timed out", "timed out", "Timeout", "timeout")


class Progress:
    def __init__(self, run_dir: Path, rank: int):
        self.dir, self.rank = run_dir / "progress", rank
        self.dir.mkdir(exist_ok=True)
        self.file = self.dir / f"rank{rank}"
        self.at(0, "start")  # data, model and engine: before the first step

    def at(self, step: int, point: str) -> None:
        self.step, self.point = step, point
        self.file.write_text(json.dumps({"step": step, "point": point}))


def _position(seen: dict) -> tuple[int, int]:
    return seen["step"], POINTS.index(seen["point"])


def collective_failure(error: BaseException, progress: Progress, timeout_s: int) -> str | None:
    """One line for a collective that failed because of another rank, or None for any other error."""
    text = str(error)
    timed_out = any(s in text for s in TIMED_OUT)
    if not (timed_out or any(s in text for s in PEER_LOST) or isinstance(error, dist.DistError)):
        return None
    seen = {}
    for file in sorted(progress.dir.glob("rank*")):
        try:
            seen[int(file.name[4:])] = json.loads(file.read_text())
        except (ValueError, OSError):  # a rank killed mid-write
            continue
    behind = [r for r, s in seen.items() if _position(s) < (progress.step, POINTS.index(progress.point))]
    what = (f"timed out after parallel.timeout_s={timeout_s} s waiting for another rank" if timed_out
            else "lost its peer: another rank ended")
    who = ("; behind: " + ", ".join(f"rank {r} (last at step {seen[r]['step']} {seen[r]['point']})" for r in behind)
           if behind else "; no rank was seen behind this one")
    # gloo's first sentence, without the source location it starts with: "Read error ...: Connection reset by peer"
    detail = re.sub(r"^\[[^\]]*\]\s*", "", text.strip().splitlines()[0]).split(". ")[0] if text.strip() else ""
    return (f"rank {progress.rank} at step {progress.step} {progress.point}: a collective {what}{who} "
            f"({detail or type(error).__name__}); the last complete checkpoint is kept: run the same command to "
            f"resume")

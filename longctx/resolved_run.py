"""A recipe with what the launcher decided for this job: every rank executes it as given.

The launcher (`launcher/run.py`) validates the recipe and plans it once, with the job's own world and memory:
`parallel.auto` becomes concrete settings, `train.checkpointing=auto` a layout of decoder layers, the ZeRO
settings a DeepSpeed config that DeepSpeed's parser has accepted. The library never plans.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from longctx.activation_checkpointing import Layout
from longctx.config import Recipe


@dataclass(frozen=True)
class ResolvedRun:
    recipe: Recipe  # `parallel.auto` already replaced by the planner's choice
    layout: Layout  # activation checkpointing of the decoder layers, bottom to top
    ds_config: dict
    resume_from: Path | None  # the checkpoint preflight checked this recipe can resume (None: a fresh start)
    gpu_peak: int | None = None  # bytes per GPU the planner predicts for a step (None: ranks on CPU)
    gpu_mem: int | None = None  # bytes of this rank's GPU the plan was made for

    def record(self) -> dict:
        """What run.json keeps of the decisions."""
        gib = (lambda n: None if n is None else round(n / 2**30, 2))
        return {"layout": asdict(self.layout), "planned_gpu_peak_gib": gib(self.gpu_peak), "gpu_gib": gib(self.gpu_mem),
                "resumed_from": None if self.resume_from is None else str(self.resume_from)}

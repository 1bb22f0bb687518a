"""The training loop on the DeepSpeed engine: data in, loss out, checkpoints, metrics, export.

The loop does not know how attention, RoPE or checkpointing work: the model arrives patched.
The loss of a step is the mean over every predicted token of the step (all micro-batches,
all data-parallel ranks, all sequence-parallel shards), so gradient accumulation, world size
and sp do not change it.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import re
import resource
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import deepspeed
import torch
import torch.distributed as dist
from tqdm import tqdm

from longctx import checkpoint, export, sequence_parallel
from longctx.config import Recipe, to_yaml
from longctx.curves import log_step, plot_curves
from longctx.data import IGNORE_INDEX, Packed, WindowSampler
from longctx.fault_injection import inject
from longctx.loss import causal_lm_loss
from longctx.model import load_model
from longctx.progress import Progress
from longctx.resolved_run import ResolvedRun
from longctx.topology import Topology

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


class RunStopped(RuntimeError):
    """The run met a fault it can name (non-finite step, out of memory, disk full) and stopped; the message is
    one line for the user, and the last complete checkpoint is untouched. `shared`: every rank stops with the
    same line (rank 0 says it), not only the rank the fault hit."""

    def __init__(self, line: str, shared: bool = False):
        super().__init__(line)
        self.shared = shared


class CausalLMWithLoss(torch.nn.Module):
    """What the engine runs: (input_ids, position_ids, labels) -> (loss sum, predicted tokens)."""

    def __init__(self, lm: torch.nn.Module, chunk_tokens: int):
        super().__init__()
        self.lm = lm
        self.chunk_tokens = chunk_tokens

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return causal_lm_loss(self.lm, input_ids, position_ids, labels, self.chunk_tokens)


def lr_schedule(recipe: Recipe) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LambdaLR]:
    """Linear warm-up (the first step already trains), then cosine down to min_lr_ratio."""
    t = recipe.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / (t.warmup_steps + 1)
        progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps - 1)
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class PreemptionFlag:
    """SIGTERM / SIGUSR1 (SLURM's warning) ask for a checkpoint and a clean exit at the next step."""

    def __init__(self) -> None:
        self.raised = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.raised = True

    def agreed(self, device: torch.device) -> bool:
        """True on every rank if any rank was signalled, so all ranks stop at the same step."""
        flag = torch.tensor([float(self.raised)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def gradient_scale(recipe: Recipe, topo: Topology) -> float:
    """What undoes DeepSpeed's averaging, so gradients are those of the loss summed over the step's
    tokens (divided by their count by the caller). DeepSpeed divides by the accumulation steps and
    averages over data-parallel ranks, summing over the sp ranks of a sequence; ZeRO-3's
    reduce-scatter averages over the sp ranks too (they share its partition group)."""
    averaged = topo.dp_size * (topo.sp_size if recipe.parallel.zero_stage == 3 else 1)
    return recipe.train.grad_accum * averaged


def _newest_checkpoint(ckpt_root: Path) -> str:
    found = checkpoint.complete_checkpoints(ckpt_root)
    return f"the last checkpoint, {found[-1]}, is intact" if found else "no checkpoint was written yet"


def non_finite(step: int, loss: float, grad_norm: float | None, applied: bool, ckpt_root: Path) -> str:
    """The line of a step whose loss or gradients are NaN/Inf."""
    what = f"step {step}: loss {loss}, gradient norm {grad_norm}"
    if applied:  # an engine that does not check gradients (ZeRO-0) has already updated the weights
        return (f"{what}: the optimizer applied it (parallel.zero_stage=0 does not check gradients), so training "
                f"stopped without writing a checkpoint; {_newest_checkpoint(ckpt_root)}")
    return (f"{what}: stopped before the update (train.on_nonfinite=stop); {_newest_checkpoint(ckpt_root)}; "
            f"to pass over such steps run the same command with train.on_nonfinite=skip, or lower train.lr")


def out_of_memory(error: torch.OutOfMemoryError, step: int, run: ResolvedRun, rank: int, ckpt_root: Path) -> str:
    """The line of a step that ran out of device memory: what was asked, what the planner predicted."""
    asked = re.search(r"Tried to allocate [\d.]+ \w+", str(error))
    recipe = run.recipe
    tokens = recipe.train.micro_batch_size * recipe.data.seq_len // recipe.parallel.sp
    if run.gpu_peak is not None:
        planned = f"the planner predicted a peak of {run.gpu_peak / 2**30:.1f} GiB of {run.gpu_mem / 2**30:.1f} GiB"
    else:
        planned = "the planner predicts GPUs only"
    return (f"step {step}: out of memory on rank {rank} ({asked.group(0) if asked else 'an allocation'}; "
            f"{tokens:,} tokens per micro-batch); "
            f"{planned}; {_newest_checkpoint(ckpt_root)}; see `longctx plan` for settings that fit, then "
            f"run the same command to resume")


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def micro_batch(packed: Packed, indices: list[int], device: torch.device) -> dict:
    def take(a):
        return torch.from_numpy(a[indices]).long().to(device)

    return {"input_ids": take(packed.input_ids), "position_ids": take(packed.position_ids), "labels": take(packed.labels)}


class Metrics:
    """One JSON object per optimizer step in <out_dir>/metrics.jsonl (rank 0 writes)."""

    def __init__(self, path: Path, resume_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled and path.exists():  # a resumed run rewrites the steps after its checkpoint
            kept = [l for l in path.read_text().splitlines() if l and json.loads(l)["step"] <= resume_step]
            path.write_text("".join(l + "\n" for l in kept))

    def write(self, row: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")


def train(run: ResolvedRun, topo: Topology, run_dir: Path, progress: Progress,
          tokenizer: PreTrainedTokenizerBase, packed: Packed) -> dict:
    recipe, ds_config = run.recipe, run.ds_config
    t, device = recipe.train, topo.device
    is_main = topo.rank == 0
    model, record = load_model(recipe, device, run.layout, ds_config, topo.sp_group if topo.sp_size > 1 else None)
    if is_main:
        (run_dir / "recipe.yaml").write_text(to_yaml(recipe))
        (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
        info = {**record, **run.record(), "windows": len(packed), "documents": packed.documents,
                "world": topo.world_size}
        (run_dir / "run.json").write_text(json.dumps(info, indent=2))
        for line in record["changes"]:
            log.info(line)

    engine, _, _, _ = deepspeed.initialize(
        model=CausalLMWithLoss(model, t.loss_chunk_tokens),
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=lr_schedule(recipe),
        mpu=topo.mpu(),
    )
    engine.train()  # from_pretrained hands back a model in eval mode, where S²-Attn and dropout are off
    ckpt_root = run_dir / "checkpoints"
    start, tokens_seen, skipped = 0, 0, 0
    resume_from = run.resume_from
    if resume_from is not None:
        state = checkpoint.load(engine, resume_from, t.resume)
        start, tokens_seen, skipped = state["step"], state["tokens"], state.get("skipped", 0)
        if is_main:
            log.info("resumed from %s at step %d", resume_from, start)

    sampler = WindowSampler(len(packed), t.seed, t.micro_batch_size, t.grad_accum, topo.dp_size)
    metrics = Metrics(run_dir / "metrics.jsonl", start, is_main)
    preempt = PreemptionFlag()
    bar = tqdm(total=t.max_steps, initial=start, desc="train", disable=not is_main, dynamic_ncols=True)
    step, status, last_saved = start, "finished", start if resume_from is not None else None
    while step < t.max_steps:
        began = time.perf_counter()
        progress.at(step + 1, "batch")
        inject("batch", step + 1, topo.rank)
        # every rank of an sp group reads the same windows and keeps its shard of them
        batches = [sequence_parallel.shard_batch(micro_batch(packed, sampler.indices(step, m, topo.dp_rank), device),
                                                 topo.sp_rank, topo.sp_size) for m in range(t.grad_accum)]
        counts = torch.tensor([float(sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches))], device=device)
        topo.all_reduce_world(counts)
        n_total = counts.item()
        lr = engine.get_lr()[0]
        loss_total = torch.zeros((), device=device)
        scale = gradient_scale(recipe, topo) / max(n_total, 1.0)
        try:
            for batch in batches:
                progress.at(step + 1, "forward")
                inject("forward", step + 1, topo.rank)
                loss_sum, _ = engine(**batch)
                loss_sum = loss_sum * inject("loss", step + 1, topo.rank)
                progress.at(step + 1, "backward")
                engine.backward(loss_sum * scale * inject("backward", step + 1, topo.rank))
                progress.at(step + 1, "optimizer step")
                engine.step()
                loss_total += loss_sum.detach().float()
        except torch.OutOfMemoryError as e:
            raise RunStopped(out_of_memory(e, step + 1, run, topo.rank, ckpt_root)) from None
        progress.at(step + 1, "metrics")
        topo.all_reduce_world(loss_total)
        loss = loss_total.item() / max(n_total, 1.0)  # .item() waits for the device: time after it
        step += 1
        elapsed = time.perf_counter() - began
        step_tokens = t.grad_accum * t.micro_batch_size * recipe.data.seq_len * topo.dp_size
        tokens_seen += step_tokens
        grad_norm = engine.get_global_grad_norm()
        if not engine.was_step_applied() or not math.isfinite(loss) or (grad_norm is not None
                                                                          and not math.isfinite(grad_norm)):
            if t.on_nonfinite == "stop" or engine.was_step_applied():
                raise RunStopped(non_finite(step, loss, grad_norm, engine.was_step_applied(), ckpt_root), shared=True)
            skipped += 1
            log.warning("step %d: non-finite loss (%s) or gradients: no update (train.on_nonfinite=skip; %d "
                        "skipped so far)", step, loss, skipped)
        row = {
            "step": step,
            "loss": loss,
            "lr": lr,
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "tokens": tokens_seen,
            "tokens_per_s": step_tokens / elapsed,
            "step_s": elapsed,
            "peak_mem_gib": round(peak_memory_gib(device), 3),
            "skipped_steps": skipped,
        }
        metrics.write(row)
        log_step(engine, row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}", mem=f"{row['peak_mem_gib']:.1f}G")
        stop = preempt.agreed(device)
        if (t.save_every and step % t.save_every == 0) or stop or step == t.max_steps:
            progress.at(step, "checkpoint")
            try:
                checkpoint.save(engine, ckpt_root, step, {"step": step, "tokens": tokens_seen, "skipped": skipped},
                                t.keep_checkpoints, checkpoint.identity(recipe, record["rope"]))
            except checkpoint.DiskFull as e:
                raise RunStopped(str(e)) from None
            last_saved = step
        if stop:
            status = "preempted"
            break
    bar.close()
    if is_main and (run_dir / "metrics.jsonl").is_file():
        plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
    summary = {"status": status, "step": step, "last_checkpoint": last_saved, "run_dir": str(run_dir)}
    progress.at(step, "export")
    if status == "finished" and t.export:
        summary.update(export.export_run(engine, model, recipe, tokenizer, run_dir, is_main))
        if recipe.eval.at_end and is_main:
            # the exported model is evaluated alone: the engine's weights and optimizer states go first, and
            # the other ranks have returned (no collective waits on an evaluation of unknown length)
            del engine, model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            from longctx.evaluation import run_at_end

            summary["eval"] = run_at_end(summary["hf"], recipe.eval, str(run_dir / "eval"))
    return summary

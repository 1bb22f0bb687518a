"""Entry point on every rank: `deepspeed launcher/run.py --config R [key=value ...]`.

Also `python launcher/run.py ...` (one process), `longctx train ...`, `srun python launcher/run.py`
and `mpirun -n N python launcher/run.py` (ranks discovered from SLURM/MPI variables). The recipe
is validated against the schema and its files (model config, tokenizer, data, checkpoint), and
on GPUs against the memory planner, before anything is loaded or written; a bad value or a step
that cannot fit exits with code 2 and one line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from longctx.checkpoint import tag_for
from longctx.cli import ArgParser
from longctx.config import ConfigError, Recipe, load_recipe
from longctx.launcher.discovery import DiscoveryError, discover, free_port

if TYPE_CHECKING:
    from longctx.launcher.plan import Cluster


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgParser(prog="longctx train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="recipe YAML file")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    parser.add_argument("--ignore-plan", action="store_true", help="train even if the memory planner says it cannot fit")
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides, e.g. train.max_steps=10")
    return parser.parse_intermixed_args(argv)  # flags may follow the key=value overrides


def single_process_env() -> None:
    """Let `python launcher/run.py` run as a world of one when no launcher set the variables."""
    if discover() is None:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))


def check_world(recipe: Recipe) -> None:
    from longctx.sequence_parallel import check_recipe

    check_recipe(recipe, int(os.environ.get("WORLD_SIZE", "1")))


def gpu_memory() -> int | None:
    """Total memory of this rank's GPU, or None when training runs on CPU."""
    import torch

    if os.environ.get("DS_ACCELERATOR", "cuda") != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(int(os.environ["LOCAL_RANK"])).total_memory


def job_cluster() -> Cluster:
    """This job as the planner sees it: ranks per node, memory of this rank's GPU (on CPU, the ranks
    of a node share its available memory), available host memory."""
    from longctx.checkpointing import available_host_bytes
    from longctx.launcher.plan import Cluster

    world = int(os.environ["WORLD_SIZE"])
    # ranks on this node: deepspeed's launcher sets LOCAL_SIZE; torchrun and our SLURM/MPI discovery LOCAL_WORLD_SIZE
    local = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or world)
    host = available_host_bytes()
    return Cluster(nodes=max(1, world // local), gpus_per_node=local, gpu_mem=gpu_memory() or host // local,
                   host_mem=host)


def resolve_parallel_auto(recipe: Recipe) -> Recipe:
    """`parallel.auto` settings replaced by the planner's choice for this job; rank 0 prints it."""
    if not recipe.parallel.auto:
        return recipe
    from longctx.launcher.plan import resolve_auto

    recipe, line = resolve_auto(recipe, job_cluster(), on_gpu=gpu_memory() is not None)
    if int(os.environ["RANK"]) == 0:
        print(line, file=sys.stderr)
    return recipe


def check_plan(recipe: Recipe) -> None:
    """On GPUs, refuse a step the planner says cannot fit the GPU or the host memory."""
    from longctx.launcher.plan import refusal

    if gpu_memory() is not None:
        reason = refusal(recipe, job_cluster())
        if reason is not None:
            raise ConfigError(reason)


def refuse(error: Exception) -> int:
    """Every rank reaches the same verdict; rank 0 says it, in one line."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {error}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        single_process_env()
        recipe = resolve_parallel_auto(load_recipe(args.config, args.overrides))
        check_world(recipe)
        from longctx.preflight import check_inputs

        check_inputs(recipe)
        if not args.ignore_plan:
            check_plan(recipe)
    except (ConfigError, DiscoveryError) as e:
        return refuse(e)
    rank = int(os.environ["RANK"])
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[rank{rank}] %(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from longctx.launcher.topology import init_topology
    from longctx.train import train

    topo = init_topology(recipe.parallel.sp)
    run_dir = Path(recipe.train.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        summary = train(recipe, topo, run_dir)
    except ConfigError as e:  # a rule only the loaded data can check (e.g. records in a format we do not read)
        return refuse(e)
    if rank == 0:
        print(report(summary, run_dir))
        print(json.dumps(summary))
    return 0


def report(summary: dict, run_dir: Path) -> str:
    """Where the run's results are, for a person."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    lines = [
        f"{summary['status']} at step {summary['step']}",
        f"loss          {first['loss']:.4f} (step {first['step']}) -> {last['loss']:.4f} (step {last['step']})",
        f"metrics       {run_dir / 'metrics.jsonl'}",
    ]
    if summary["last_checkpoint"] is not None:
        lines.append(f"checkpoint    {run_dir / 'checkpoints' / tag_for(summary['last_checkpoint'])}")
    for key, text in (("hf", "model (HF)"), ("adapter", "adapter"), ("eval", "evaluation")):
        if key in summary:
            lines.append(f"{text:<14}{summary[key] if key != 'eval' else run_dir / 'eval'}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

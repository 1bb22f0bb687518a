"""Entry point on every rank: `deepspeed launcher/run.py --config R [key=value ...]`.

Also `python launcher/run.py ...` (one process), `longctx train ...`, `srun python launcher/run.py`
and `mpirun -n N python launcher/run.py` (ranks discovered from SLURM/MPI variables). The recipe
is validated against the schema and its files (model config, tokenizer, data, checkpoint), then
planned once for this job (`resolve`): the result, a `ResolvedRun`, is what `longctx.train`
executes. A bad value or a step that cannot fit exits with code 2 and one line, before anything
is loaded or written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from longctx.checkpoint import saved_step, tag_for
from longctx.cli import ArgParser
from longctx.config import ConfigError, Recipe, load_recipe
from longctx.launcher.discovery import DiscoveryError, check_master_port, discover, free_port
from longctx.resolved_run import ResolvedRun

if TYPE_CHECKING:
    from longctx.launcher.memory_model import Cluster


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


def gpu_memory() -> int | None:
    """Total memory of this rank's GPU, or None when training runs on CPU."""
    import torch

    if os.environ.get("DS_ACCELERATOR", "cuda") != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(int(os.environ["LOCAL_RANK"])).total_memory


def job_cluster(gpu_mem: int | None) -> Cluster:
    """This job as the planner sees it: ranks per node, memory of this rank's GPU (`gpu_mem`; on CPU, None: the
    ranks of a node share its available memory), available host memory."""
    from longctx.activation_checkpointing import available_host_bytes
    from longctx.launcher.memory_model import Cluster

    world = int(os.environ["WORLD_SIZE"])
    # ranks on this node: deepspeed's launcher sets LOCAL_SIZE; torchrun and our SLURM/MPI discovery LOCAL_WORLD_SIZE
    local = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or world)
    host = available_host_bytes()
    return Cluster(nodes=max(1, world // local), gpus_per_node=local, gpu_mem=gpu_mem or host // local,
                   host_mem=host)


def resolve_parallel_auto(recipe: Recipe, cluster: Cluster, on_gpu: bool) -> Recipe:
    """`parallel.auto` settings replaced by the planner's choice for this job; rank 0 prints it."""
    if not recipe.parallel.auto:
        return recipe
    from longctx.launcher.fit import resolve_auto

    recipe, line = resolve_auto(recipe, cluster, on_gpu)
    if int(os.environ["RANK"]) == 0:
        print(line, file=sys.stderr)
    return recipe


def resolve(recipe: Recipe, cluster: Cluster, on_gpu: bool, ignore_plan: bool,
            resume_from: Path | None) -> ResolvedRun:
    """What the recipe leaves to this job, decided once: the DeepSpeed config (checked by DeepSpeed's parser)
    and, on GPUs, the planner's estimate for this job's GPU and host memory, which refuses a step that cannot
    fit and gives the checkpointing layout. On CPU, where activations live in host memory anyway,
    `train.checkpointing=auto` is `full`."""
    import torch

    from longctx.activation_checkpointing import layout_for
    from longctx.launcher.dsconfig import build_ds_config, check_ds_config
    from longctx.launcher.fit import from_recipe, refusal
    from longctx.launcher.memory_model import estimate
    from longctx.model import resolve_dtype

    dtype = resolve_dtype(recipe.model.dtype, torch.device("cuda" if on_gpu else "cpu"))
    ds_config = build_ds_config(recipe, bf16=dtype == torch.bfloat16)
    check_ds_config(ds_config)
    shape, features, settings = from_recipe(recipe, on_gpu)
    if not on_gpu:
        t = recipe.train
        layout = layout_for("full" if t.checkpointing == "auto" else t.checkpointing, shape.layers,
                            t.gpu_checkpoint_layers)
        return ResolvedRun(recipe, layout, ds_config, resume_from)
    est = estimate(shape, features, settings, cluster, recipe.data.seq_len)
    if not est.fits and not ignore_plan:
        raise ConfigError(refusal(recipe, cluster, est))
    return ResolvedRun(recipe, est.layout, ds_config, resume_from, est.gpu_peak, cluster.gpu_mem)


def refuse(error: Exception) -> int:
    """Every rank reaches the same verdict; rank 0 says it, in one line."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {error}", file=sys.stderr)
    return 2


def stopped(line: str | None) -> NoReturn:
    """A run that met a fault mid-way: one line (None: another rank says it), no traceback, and a status a
    scheduler sees as failed. The process ends at once: the other ranks may be stuck in a collective that
    would hold its exit."""
    if line is not None:
        print(f"\nerror: {line}", file=sys.stderr, flush=True)  # on a line of its own, after any progress bar
    os._exit(1)


def completed(run: ResolvedRun) -> Path | None:
    """The checkpoint of a run already trained to train.max_steps whose results are written, if this is one."""
    last, t = run.resume_from, run.recipe.train
    if last is None or saved_step(last) < t.max_steps:
        return None
    return last if not t.export or (Path(t.out_dir) / "hf" / "config.json").is_file() else None


def main(argv: list[str] | None = None) -> int:
    # DeepSpeed's ZeRO calls a torch collective under its deprecated name on every step
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        if args.config is None:
            raise ConfigError("--config is missing: give a recipe file, e.g. --config recipes/demo-cpu.yaml")
        single_process_env()
        gpu_mem = gpu_memory()
        cluster, on_gpu = job_cluster(gpu_mem), gpu_mem is not None
        recipe = resolve_parallel_auto(load_recipe(args.config, args.overrides), cluster, on_gpu)
        from longctx.preflight import check_inputs

        run = resolve(recipe, cluster, on_gpu, args.ignore_plan, check_inputs(recipe, int(os.environ["WORLD_SIZE"])))
        check_master_port()
    except (ConfigError, DiscoveryError) as e:
        return refuse(e)
    rank = int(os.environ["RANK"])
    run_dir = Path(recipe.train.out_dir)
    done = completed(run)
    if done is not None:
        if rank == 0:
            print(f"{run_dir}: already trained to step {saved_step(done)} (train.max_steps="
                  f"{recipe.train.max_steps}); nothing to do. To train further raise train.max_steps; to start "
                  f"over, train.resume=never or another train.out_dir.\n{report(run_dir, saved_step(done))}")
        return 0
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[rank{rank}] %(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from longctx.data import build_shared
    from longctx.model import load_tokenizer
    from longctx.progress import Progress, collective_failure
    from longctx.topology import init_topology
    from longctx.train import RunStopped, train

    topo = init_topology(recipe.parallel.sp, recipe.parallel.timeout_s)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(recipe)
    progress = Progress(run_dir, rank)
    try:
        # the two rules only a started run can check: the data fills a window (once tokenised), and the checkpoint
        # to resume is whole (its checksums are read as it loads)
        packed = build_shared(recipe.data, tokenizer, recipe.train.seed, str(run_dir / "data"), rank)
        summary = train(run, topo, run_dir, progress, tokenizer, packed)
    except ConfigError as e:
        if rank == 0 and created:  # a refused run leaves nothing behind
            shutil.rmtree(run_dir, ignore_errors=True)
        return refuse(e)
    except RunStopped as e:  # an OOM or a full disk may hit one rank only: each rank it hits says it
        return stopped(str(e) if rank == 0 or not e.shared else None)
    except RuntimeError as e:
        line = collective_failure(e, progress, recipe.parallel.timeout_s)
        if line is None:
            raise
        return stopped(line)
    if rank == 0:
        print(f"{summary['status']} at step {summary['step']}\n{report(run_dir, summary['last_checkpoint'])}")
        for name, line in summary.get("eval", {}).items():
            print(f"eval {name:<9}{line}")
        if "eval" in summary and recipe.model.config is not None:
            print(f"(model.config: weights trained from random for {summary['step']} steps; perplexity near the "
                  f"vocabulary size and needle accuracy 0 are what such a model scores: the reports show the "
                  f"evaluations run, not a trained model's quality)")
        print(json.dumps(summary))
    return 0


def report(run_dir: Path, last_checkpoint: int | None) -> str:
    """Where a run's results are, for a person."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    lines = [
        f"loss          {first['loss']:.4f} (step {first['step']}) -> {last['loss']:.4f} (step {last['step']})",
        f"metrics       {run_dir / 'metrics.jsonl'}",
    ]
    if (run_dir / "curves.png").is_file():
        lines.append(f"curves        {run_dir / 'curves.png'}")
    if last_checkpoint is not None:
        lines.append(f"checkpoint    {run_dir / 'checkpoints' / tag_for(last_checkpoint)}")
    for name, text in (("hf", "model (HF)"), ("adapter", "adapter"), ("eval", "evaluation")):
        if (run_dir / name).is_dir():
            lines.append(f"{text:<14}{run_dir / name}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""Entry point on every rank: `deepspeed launcher/run.py --config R [key=value ...]`.

Also `python launcher/run.py ...` (one process) and `longctx train ...`. The recipe is
validated before anything is loaded or written; a bad value exits with code 2 and one line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from pathlib import Path

from longctx.checkpoint import tag_for
from longctx.config import ConfigError, Recipe, load_recipe


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="longctx train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="recipe YAML file")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides, e.g. train.max_steps=10")
    return parser.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_env() -> None:
    """Let `python launcher/run.py` run as a world of one when no launcher set the variables."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))


def check_world(recipe: Recipe) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    sp = recipe.parallel.sp
    if sp > 1:
        raise ConfigError(f"parallel.sp={sp}: sequence parallelism is not available in this version; allowed: 1")
    if world % sp:
        raise ConfigError(f"parallel.sp={sp}: must divide the number of ranks ({world})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        recipe = load_recipe(args.config, args.overrides)
        check_world(recipe)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    single_process_env()
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
    summary = train(recipe, topo, run_dir)
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

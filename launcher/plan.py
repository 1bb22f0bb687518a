"""`longctx plan`: per-GPU and host memory of a recipe's step (`launcher/memory_model.py`), whether it fits,
the longest sequence that does and settings that fit (`launcher/fit.py`)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, replace
from typing import Optional

from longctx.config import PLANNER_CHOICES, ConfigError, Recipe, load_recipe
from longctx.launcher.fit import choose, from_recipe, longest_any, longest_fitting
from longctx.launcher.memory_model import (ATTENTION_KINDS, GPU_RESERVED_BYTES, GiB, Cluster, Estimate, Settings,
                                           estimate, trainable_params)


def parse_bytes(text: str) -> int:
    """'80GiB' -> 80 * 2**30, '80GB' -> 80 * 10**9, '512G' -> GiB (as nvidia-smi and free mean it)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: not a positive size such as 80GiB, 80GB or 512G")
    number, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    power = "KMGT".index(unit) + 1 if unit else 0
    decimal = text.strip().upper().endswith("B") and not binary
    return int(number * (1000 if decimal else 1024) ** power)


def format_table(est: Estimate) -> str:
    phases = est.phases()
    at_peak = max(phases, key=phases.get)
    lines = [f"per GPU at seq_len {est.seq_len:,} ({est.settings.describe()})", f"  {est.layout.describe()}"]
    for name, n in est.gpu.items():
        lines.append(f"  {name:<34}{n / GiB:9.2f} GiB")
    lines.append(f"  {'peak':<34}{est.gpu_peak / GiB:9.2f} GiB   of {est.gpu_limit / GiB:.2f} usable, at the {at_peak}")
    lines.append("per node, host memory")
    for name, n in est.host.items():
        lines.append(f"  {name:<44}{n / GiB:9.2f} GiB")
    lines.append(f"  {'peak':<44}{est.host_peak / GiB:9.2f} GiB   of {est.host_limit / GiB:.2f}")
    return "\n".join(lines)


def _count(least: int):
    """An argparse type: a whole number >= least (its error names the value; argparse adds the flag)."""
    def parse(text: str) -> int:
        if not text.strip().isdigit() or int(text) < least:
            raise argparse.ArgumentTypeError(f"{text!r}: not a whole number >= {least}")
        return int(text)

    return parse


def _searchable(text: str) -> set[str]:
    names = {k for k in text.split(",") if k}
    unknown = sorted(names - set(PLANNER_CHOICES))
    if unknown:
        raise argparse.ArgumentTypeError(f"{','.join(unknown)}: not one of {','.join(PLANNER_CHOICES)}")
    return names


def parse_args(argv: list[str]) -> argparse.Namespace:
    from longctx.cli import ArgParser

    p = ArgParser(prog="longctx plan")  # its description is the line `longctx` lists
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    p.add_argument("--nodes", type=_count(1), default=1, help="number of nodes (hosts)")
    p.add_argument("--gpus-per-node", type=_count(1), default=1, help="GPUs (ranks) on each node")
    p.add_argument("--gpu-mem", type=parse_bytes, default="80GiB",
                   help=f"total memory of one GPU (80GiB = 80 x 2^30 bytes, 80GB = 80 x 10^9); the planner reserves "
                        f"{GPU_RESERVED_BYTES / GiB:g} GiB of it for the CUDA context and workspaces, the rest is usable")
    # None, not the size: the output says when the planner assumed it
    p.add_argument("--host-mem", type=parse_bytes, default=None,
                   help=f"host memory of one node (default: {Cluster.host_mem / GiB:g}GiB, assumed when not given; "
                        f"the output says so)")
    p.add_argument("--free", type=_searchable, default=",".join(PLANNER_CHOICES),
                   help=f"settings the planner may choose, from {','.join(PLANNER_CHOICES)} ('' = none)")
    p.add_argument("--attention", choices=ATTENTION_KINDS, help="override the attention kind implied by the recipe")
    p.add_argument("--loss", choices=("chunked", "full"), help="full: (seq x vocab) logits, as plain Hugging Face")
    p.add_argument("--mlp-tile-tokens", type=_count(0), help="tiled MLP: tokens per tile (0 = untiled); "
                   "default: the recipe's train.tiled_mlp and train.mlp_tile_tokens")
    p.add_argument("--norm", choices=("fused", "torch"), help="torch: transformers' RMSNorm (keeps a float32 input copy)")
    p.add_argument("--engine", choices=("deepspeed", "torch"), default="deepspeed",
                   help="torch: plain optimizer, adapters in fp32 (peft's default), no ZeRO buffers")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return p.parse_intermixed_args(argv)


def plan(recipe: Recipe, cluster: Cluster, f_overrides: dict,
         free: set[str]) -> tuple[dict, Estimate, Optional[Estimate]]:
    """Everything `longctx plan` reports as a dict, with the recipe's and the chosen estimates."""
    shape, f, s = from_recipe(recipe)
    f = replace(f, **f_overrides)
    seq = recipe.data.seq_len
    as_written = estimate(shape, f, s, cluster, seq)
    chosen = choose(shape, f, cluster, seq, s, free)
    longest, longest_settings = longest_any(shape, f, cluster, s, free)
    report = {
        "model": {**asdict(shape), "params": shape.params, "trainable": trainable_params(shape, f)},
        "features": asdict(f),
        "cluster": asdict(cluster),
        "recipe": as_written.as_dict(),
        "recipe_longest_seq_len": longest_fitting(shape, f, s, cluster),
        "chosen": None if chosen is None else chosen.as_dict(),
        "longest_seq_len": longest,
        "longest_settings": None if longest_settings is None else asdict(longest_settings),
    }
    return report, as_written, chosen


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    cluster = Cluster(args.nodes, args.gpus_per_node, args.gpu_mem, args.host_mem or Cluster.host_mem)
    recipe = load_recipe(args.recipe, args.overrides)
    free = args.free
    f_overrides = {k: v for k, v in (("attention", args.attention), ("loss", args.loss), ("norm", args.norm),
                                      ("mlp_tile_tokens", args.mlp_tile_tokens)) if v is not None}
    if args.mlp_tile_tokens is not None:  # a tile size given on the command line applies at every length
        f_overrides["mlp_tile_from"] = 0
    if args.engine == "torch":
        f_overrides.update(engine="torch", adapter_fp32=True)
    result, as_written, chosen = plan(recipe, cluster, f_overrides, free)
    result["cluster"]["host_mem_assumed"] = args.host_mem is None
    if args.json:
        print(json.dumps(result, indent=2))
        return 0 if as_written.fits else 1
    host = "assumed, as --host-mem was not given" if args.host_mem is None else "--host-mem"
    print(f"cluster: {cluster.nodes} node(s) x {cluster.gpus_per_node} GPU(s); per GPU {cluster.gpu_mem / GiB:.2f} GiB, "
          f"of which {(cluster.gpu_mem - GPU_RESERVED_BYTES) / GiB:.2f} usable ({GPU_RESERVED_BYTES / GiB:.2f} reserved "
          f"for the CUDA context and workspaces); host memory per node {cluster.host_mem / GiB:.2f} GiB ({host})\n")
    print(format_table(as_written))
    verdict = "fits" if as_written.fits else "does NOT fit"
    print(f"\nthe recipe as written {verdict}; longest sequence with its settings: {result['recipe_longest_seq_len']:,}")
    if chosen is None:
        print(f"no setting of {','.join(sorted(free)) or '(none free)'} fits seq_len {recipe.data.seq_len:,}")
    else:
        print(f"chosen for seq_len {recipe.data.seq_len:,}: {chosen.settings.describe()} "
              f"(peak {chosen.gpu_peak / GiB:.1f} GiB)")
    if result["longest_settings"] is not None:
        print(f"longest sequence with any of those settings: {result['longest_seq_len']:,} "
              f"({Settings(**result['longest_settings']).describe()})")
    return 0 if as_written.fits else 1


if __name__ == "__main__":  # `python -m longctx.launcher.plan`, as `longctx plan` runs it
    try:
        sys.exit(main(sys.argv[1:]))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

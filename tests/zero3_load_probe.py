"""Started by `deepspeed` from tests/test_zero3_load.py: one rank builds the model of a recipe and writes how far its
resident memory rose while building (the process peak over the resident size just before)."""

import json
import resource
import sys

import deepspeed
import psutil
import torch

from longctx.config import load_recipe
from longctx.launcher.dsconfig import build_ds_config
from longctx.model import build_model, scaled_config

if __name__ == "__main__":
    out, *recipe_args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher's argument
    deepspeed.init_distributed(dist_backend="gloo")
    recipe = load_recipe("recipes/demo-cpu.yaml", recipe_args)
    config, _ = scaled_config(recipe)
    before = psutil.Process().memory_info().rss
    model = build_model(recipe, config, torch.float32, torch.device("cpu"), build_ds_config(recipe, bf16=False))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    rank = torch.distributed.get_rank()
    params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"growth": peak - before, "weights": params * 4}, f)

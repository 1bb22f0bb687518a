"""The DeepSpeed config of a recipe: a ZeRO template from `ds_configs/` plus the recipe's values.

The result is parsed by DeepSpeed's own `DeepSpeedConfig` before it is used, so a config
DeepSpeed would reject fails here, at start, not inside the engine.
"""

from __future__ import annotations

import json
from importlib import resources

from longctx.config import Recipe


def template(stage: int) -> dict:
    """`ds_configs/zero<stage>.json`: beside the code in a checkout, package data in an install."""
    return json.loads((resources.files("longctx.ds_configs") / f"zero{stage}.json").read_text())


def build_ds_config(recipe: Recipe, bf16: bool) -> dict:
    """train_batch_size is left for DeepSpeed to derive from its data-parallel world."""
    t, p = recipe.train, recipe.parallel
    cfg = template(p.zero_stage)
    cfg.update(
        train_micro_batch_size_per_gpu=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        gradient_clipping=t.grad_clip,
        bf16={"enabled": bf16},
        optimizer={
            "type": "AdamW",
            # torch's AdamW: the same update on CPU ranks, GPUs and with offload, and no op to compile
            "params": {"lr": t.lr, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": t.weight_decay, "torch_adam": True},
        },
    )
    zero = cfg["zero_optimization"]
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        cfg["zero_force_ds_cpu_optimizer"] = False
    if p.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if t.tensorboard:
        # DeepSpeed's monitor writes into output_path/job_name: <out_dir>/tensorboard, beside metrics.jsonl
        cfg["tensorboard"] = {"enabled": True, "output_path": t.out_dir, "job_name": "tensorboard"}
    return cfg


def check_ds_config(cfg: dict) -> None:
    """Raise if DeepSpeed's own parser rejects the config."""
    from deepspeed.runtime.config import DeepSpeedConfig

    DeepSpeedConfig(json.loads(json.dumps(cfg)))

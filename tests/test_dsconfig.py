"""The DeepSpeed config of each ZeRO stage and offload choice passes DeepSpeed's own parser."""

import pytest

from longctx.config import load_recipe
from longctx.launcher.dsconfig import build_ds_config, check_ds_config

BASE = ["model.config=longctx/assets/demo-llama"]


@pytest.mark.parametrize(
    "overrides",
    [
        ["parallel.zero_stage=0"],
        ["parallel.zero_stage=1", "parallel.offload_optimizer=true"],
        ["parallel.zero_stage=2", "train.grad_accum=4", "train.micro_batch_size=2", "train.grad_clip=0.5"],
        ["parallel.zero_stage=3", "parallel.offload_optimizer=true", "parallel.offload_params=true"],
    ],
)
@pytest.mark.parametrize("bf16", [False, True])
def test_generated_config_parses(overrides, bf16):
    recipe = load_recipe(None, BASE + overrides)
    cfg = build_ds_config(recipe, bf16=bf16)
    check_ds_config(cfg)
    zero = cfg["zero_optimization"]
    assert zero["stage"] == recipe.parallel.zero_stage
    assert cfg["bf16"]["enabled"] is bf16
    assert cfg["gradient_accumulation_steps"] == recipe.train.grad_accum
    assert cfg["train_micro_batch_size_per_gpu"] == recipe.train.micro_batch_size
    assert cfg["gradient_clipping"] == recipe.train.grad_clip
    assert ("offload_optimizer" in zero) is recipe.parallel.offload_optimizer
    assert ("offload_param" in zero) is recipe.parallel.offload_params


def test_deepspeed_parser_rejects_a_broken_config():
    cfg = build_ds_config(load_recipe(None, BASE), bf16=False)
    cfg["zero_optimization"]["stage"] = 7
    with pytest.raises(Exception, match="stage"):
        check_ds_config(cfg)

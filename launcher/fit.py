"""Which settings fit: a recipe as the memory model sees it, the longest sequence that fits, and the
search over ZeRO stage, offload, sequence parallelism and checkpointing (`parallel.auto`)."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from typing import Iterator, Optional

from longctx.config import PLANNER_CHOICES, ConfigError, Recipe, s2_group
from longctx.launcher.memory_model import GiB, Cluster, Estimate, Features, ModelShape, Settings, estimate
from longctx.sequence_parallel import allowed_degrees
from longctx.tiled_mlp import auto_tile_from


def longest_fitting(shape: ModelShape, f: Features, s: Settings, cluster: Cluster,
                    granule: int = 1024, limit: int = 1 << 24) -> int:
    """Longest sequence (a multiple of granule and of sp) whose step fits; 0 if none does."""
    step = granule * s.sp // math.gcd(granule, s.sp)
    lo, hi = 0, limit // step
    while lo < hi:  # peak grows with length: bisect on the number of steps
        mid = (lo + hi + 1) // 2
        if estimate(shape, f, s, cluster, mid * step).fits:
            lo = mid
        else:
            hi = mid - 1
    return lo * step


def candidates(shape: ModelShape, cluster: Cluster, fixed: Settings, free: set[str],
               quantized: bool = False) -> Iterator[Settings]:
    """Settings to try, cheapest first: no parameter offload, no optimizer offload, small sp,
    light checkpointing, low ZeRO stage (each step down that list costs speed). 4-bit weights run
    under ZeRO <= 2 only."""
    stages = ((1, 2) if quantized else (1, 2, 3)) if "zero_stage" in free else (fixed.zero_stage,)
    offloads = ((False, False), (True, False), (True, True)) if "offload" in free else (
        (fixed.offload_optimizer, fixed.offload_params),)
    # sp ranks share a node (topology.py): the planner does not choose sp across nodes
    sps = [d for d in allowed_degrees(shape.heads, shape.kv_heads) if cluster.gpus_per_node % d == 0] \
        if "sp" in free else [fixed.sp]
    # auto finds the fastest layout that fits (plain layers, inputs on the GPU, or in host memory)
    policies = ("auto",) if "checkpointing" in free else (fixed.checkpointing,)
    for (opt, par), sp, policy, stage in itertools.product(offloads, sps, policies, stages):
        if (par and stage != 3) or (opt and stage == 0):
            continue
        yield Settings(stage, opt, par, sp, policy, fixed.gpu_checkpoint_layers)


def choose(shape: ModelShape, f: Features, cluster: Cluster, seq_len: int, fixed: Settings,
           free: set[str]) -> Optional[Estimate]:
    """The first candidate whose step fits at seq_len, or None."""
    for s in candidates(shape, cluster, fixed, free, f.quantize == "nf4"):
        if seq_len % s.sp == 0 and estimate(shape, f, s, cluster, seq_len).fits:
            return estimate(shape, f, s, cluster, seq_len)
    return None


def longest_any(shape: ModelShape, f: Features, cluster: Cluster, fixed: Settings,
                free: set[str]) -> tuple[int, Optional[Settings]]:
    """The longest sequence any candidate reaches, and the cheapest candidate reaching it."""
    best, best_settings = 0, None
    for s in candidates(shape, cluster, fixed, free, f.quantize == "nf4"):
        n = longest_fitting(shape, f, s, cluster)
        if n > best:
            best, best_settings = n, s
    return best, best_settings


# auto on CUDA runs cuDNN for one document per row (ours for packed ones): counted as cuDNN, the larger.
# Our sdpa backend runs one SDPA call per document, no mask: counted as SDPA's flash backend.
ATTENTION_OF_BACKEND = {"auto": "cudnn", "triton": "flash", "flex": "flash", "sdpa": "sdpa-flash", "eager": "eager"}


def from_recipe(recipe: Recipe, on_gpu: bool = True) -> tuple[ModelShape, Features, Settings]:
    """The planner's view of a recipe: on GPUs bf16 and the fused RMSNorm, on CPU fp32 and transformers' norm."""
    shape = ModelShape.from_config_dir(recipe.model.path or recipe.model.config)
    dtype = recipe.model.dtype if recipe.model.dtype != "auto" else ("bf16" if on_gpu else "fp32")
    lora = recipe.lora
    extra = (shape.head_params if lora.train_embeddings else 0) + (
        (2 * shape.layers + 1) * shape.hidden if lora.train_norms else 0)
    t = recipe.train
    group = s2_group(recipe) if recipe.attention.train_pattern == "s2" else 0
    attention = ATTENTION_OF_BACKEND[recipe.attention.backend]  # auto: a row of one document, S²'s groups too
    f = Features(act_bytes=2 if dtype == "bf16" else 4, lora_r=lora.r if lora.enabled else None,
                 lora_targets=tuple(lora.targets), extra_trainable=extra if lora.enabled else 0,
                 attention=attention, attention_group=group, loss="chunked",
                 loss_chunk_tokens=t.loss_chunk_tokens, micro_batch=t.micro_batch_size,
                 mlp_tile_tokens=0 if t.tiled_mlp == "never" else t.mlp_tile_tokens,
                 mlp_tile_from=auto_tile_from(shape.intermediate) if t.tiled_mlp == "auto" else 0,
                 norm="fused" if on_gpu else "torch", quantize=recipe.model.quantize)
    p = recipe.parallel
    return shape, f, Settings(p.zero_stage, p.offload_optimizer, p.offload_params, p.sp, t.checkpointing,
                              t.gpu_checkpoint_layers)


def refusal(recipe: Recipe, cluster: Cluster, est: Estimate) -> str:
    """Why the recipe's step, estimated as `est`, cannot fit on this cluster's GPUs or host memory: the
    numbers, the longest sequence that fits and settings that would."""
    shape, f, s = from_recipe(recipe)
    longest = longest_fitting(shape, f, s, cluster)
    chosen = choose(shape, f, cluster, recipe.data.seq_len, s, set(PLANNER_CHOICES))
    instead = f"settings that fit: {chosen.settings.describe()}" if chosen else "no settings fit on these GPUs"
    if est.gpu_peak > est.gpu_limit:
        need = (f"{est.gpu_peak / GiB:.1f} GiB per GPU, {est.gpu_limit / GiB:.1f} GiB usable of "
                f"{cluster.gpu_mem / GiB:.1f}")
    else:
        need = (f"{est.host_peak / GiB:.1f} GiB of host memory per node "
                f"({est.host.get('offloaded activations', 0) / GiB:.1f} GiB of offloaded layer inputs), "
                f"{est.host_limit / GiB:.1f} GiB available")
    return (f"data.seq_len={recipe.data.seq_len}: the planner predicts {need}; longest that fits as written: "
            f"{longest}; {instead} (`longctx plan` shows the table; --ignore-plan runs anyway)")


def resolve_auto(recipe: Recipe, cluster: Cluster, on_gpu: bool = True) -> tuple[Recipe, Optional[str]]:
    """The recipe with the `parallel.auto` settings replaced by the planner's choice for this
    cluster, and a line saying what was chosen (None when nothing is left to the planner)."""
    free = set(recipe.parallel.auto)
    if not free:
        return recipe, None
    shape, f, s = from_recipe(recipe, on_gpu)
    chosen = choose(shape, f, cluster, recipe.data.seq_len, s, free)
    if chosen is None:
        raise ConfigError(f"parallel.auto={sorted(free)}: no choice fits data.seq_len={recipe.data.seq_len} on "
                          f"{cluster.world} GPU(s) of {cluster.gpu_mem / GiB:.1f} GiB (`longctx plan` shows the table)")
    c = chosen.settings
    parallel = replace(recipe.parallel, zero_stage=c.zero_stage, offload_optimizer=c.offload_optimizer,
                       offload_params=c.offload_params, sp=c.sp)
    train = replace(recipe.train, checkpointing=c.checkpointing)
    line = (f"parallel.auto={','.join(sorted(free))}: planner chose {c.describe()} "
            f"(predicted peak {chosen.gpu_peak / GiB:.1f} GiB of {chosen.gpu_limit / GiB:.1f} usable)")
    return replace(recipe, parallel=parallel, train=train), line

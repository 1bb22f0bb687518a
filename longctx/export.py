"""Export a run: `<out>/hf` loads in vanilla transformers (LoRA merged), `<out>/adapter` is PEFT's.

The full state dict is gathered from the engine (ZeRO-3 partitions included) and loaded into
a fresh model built on the meta device, so export never needs a second trained copy in memory.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from longctx.config import Recipe
from longctx.loss import unwrap_causal_lm
from longctx.model import add_lora

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def full_state_dict(engine: DeepSpeedEngine, quantized: bool) -> dict[str, torch.Tensor] | None:
    """Every parameter of the engine's module, on rank 0 (None elsewhere), 4-bit weights dequantized; call on all
    ranks."""
    if engine.zero_optimization_stage() == 3:
        state = gathered_state_dict(engine.module)
    elif quantized:
        from longctx.quantize import dequantized_state_dict

        state = dequantized_state_dict(engine.module)
    else:
        state = engine.module.state_dict()
    if dist.get_rank() != 0:
        return None
    return {k: v.detach().cpu() for k, v in state.items()}


def gathered_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A ZeRO-3 module's state dict, whole, on rank 0 (empty elsewhere): one parameter gathered at a time, so no
    rank ever holds more than one whole parameter beside its partitions."""
    import deepspeed

    state = {}
    for key, tensor in module.state_dict(keep_vars=True).items():  # keep_vars: the partitioned parameters themselves
        with deepspeed.zero.GatheredParameters([tensor] if hasattr(tensor, "ds_id") else []):
            if dist.get_rank() == 0:
                state[key] = tensor.detach().cpu().clone()
    return state


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def export_state(state: dict[str, torch.Tensor], config: PretrainedConfig, recipe: Recipe,
                 tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> dict:
    """Write hf/ (and adapter/ for LoRA) from a state dict of the trained model."""
    config = copy.deepcopy(config)
    dtype = next(iter(state.values())).dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    if recipe.lora.enabled:
        model = add_lora(model, recipe.lora)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    # tied output embeddings are not in the state dict twice; anything else missing is a bug
    missing = [k for k in missing if not (config.tie_word_embeddings and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise RuntimeError(f"export: state dict does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    written = {}
    if recipe.lora.enabled:
        model.save_pretrained(out_dir / "adapter")
        written["adapter"] = str(out_dir / "adapter")
        model = model.merge_and_unload()
    model.tie_weights()
    model.save_pretrained(out_dir / "hf")
    tokenizer.save_pretrained(out_dir / "hf")
    written["hf"] = str(out_dir / "hf")
    return written


def export_run(engine: DeepSpeedEngine, model: torch.nn.Module, recipe: Recipe, tokenizer: PreTrainedTokenizerBase,
               run_dir: Path, is_main: bool) -> dict:
    state = full_state_dict(engine, recipe.model.quantize == "nf4")
    written = {}
    if is_main:
        lm_config = unwrap_causal_lm(model).config
        written = export_state(strip_prefix(state, "lm."), lm_config, recipe, tokenizer, run_dir)
        log.info("exported %s", ", ".join(written.values()))
    dist.barrier()
    return written

"""Load a Hugging Face causal LM from a local directory, scale its RoPE, add LoRA, patch it.

The model stays a transformers model: RoPE scaling is written into its config, attention is
registered through transformers' interface, and `patch_model` reports every change it made.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig
from transformers.initialization import no_init_weights

from longctx.activation_checkpointing import (Layout, apply_checkpointing, layer_input_bytes, layout_for,
                                              require_host_memory)
from longctx.attention import attention_implementation
from longctx.config import ConfigError, LoraSection, Recipe, model_dir, s2_group
from longctx.kernels.patch import ModelPatch
from longctx.sequence_parallel import use_ulysses
from longctx.tiled_mlp import apply_tiled_mlp, use_tiled_mlp

if TYPE_CHECKING:
    from peft import LoraConfig
    from torch.distributed import ProcessGroup
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
NORM_SUFFIXES = ("input_layernorm", "post_attention_layernorm", "norm")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def load_tokenizer(recipe: Recipe) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(recipe.model.tokenizer or model_dir(recipe),
                                         trust_remote_code=recipe.model.trust_remote_code)


def scaled_config(recipe: Recipe) -> tuple[PretrainedConfig, dict]:
    """The model config with the recipe's RoPE scaling written in, and the effective values."""
    from longctx.rope import scale_from_recipe

    config = AutoConfig.from_pretrained(model_dir(recipe), trust_remote_code=recipe.model.trust_remote_code)
    return scale_from_recipe(config, recipe.rope, default_target=recipe.data.seq_len)


def build_model(recipe: Recipe, config: PretrainedConfig, dtype: torch.dtype, device: torch.device,
                ds_config: dict | None = None) -> torch.nn.Module:
    """Weights from model.path, or a seeded random init from model.config: transformers' init of each module
    without the draws of the modules' constructors, which is what ZeRO-3's partitioned init and the 4-bit
    layer-by-layer build draw too, so every path starts from the same weights. A random init runs on the rank's
    device (an 8B model initialises in seconds there, minutes on the host). Under ZeRO-3 in a process group each
    rank builds or loads its partition only (`ds_config`: the run's DeepSpeed config); with model.quantize=nf4 the
    model is built a decoder layer at a time on the device, in 4 bits."""
    torch.manual_seed(recipe.train.seed)
    if recipe.model.quantize == "nf4":
        from longctx.quantize import build_nf4_model

        return build_nf4_model(config, dtype, device, recipe.model.path)
    if recipe.parallel.zero_stage == 3 and torch.distributed.is_initialized():
        if ds_config is None:
            raise ValueError("parallel.zero_stage=3 in a process group: the model is built into partitions, "
                             "which needs the run's DeepSpeed config")
        return build_partitioned(recipe, config, dtype, ds_config)
    if recipe.model.path is not None:
        return AutoModelForCausalLM.from_pretrained(recipe.model.path, config=config, dtype=dtype,
                                                    trust_remote_code=recipe.model.trust_remote_code)
    with torch.device(device), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=recipe.model.trust_remote_code)
    model.init_weights()
    return model


def build_partitioned(recipe: Recipe, config: PretrainedConfig, dtype: torch.dtype, ds_config: dict) -> torch.nn.Module:
    """The model built or loaded straight into this rank's ZeRO-3 partition (transformers' DeepSpeed integration
    runs construction under deepspeed.zero.Init and loads each tensor into its partitions), so host memory grows
    by about 1/world of the weights per rank, not by the whole model."""
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    # transformers reads the config through a global weak reference: alive while loading, gone after, so later
    # models (the export's, the evaluations') are built whole
    hf_ds_config = HfDeepSpeedConfig(ds_config)  # noqa: F841
    remote = recipe.model.trust_remote_code
    try:
        if recipe.model.path is not None:
            return AutoModelForCausalLM.from_pretrained(recipe.model.path, config=config, dtype=dtype,
                                                        trust_remote_code=remote)
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=remote)
    finally:
        unset_hf_deepspeed_config()


def lora_config(section: LoraSection) -> LoraConfig:
    from peft import LoraConfig

    extra = (["embed_tokens"] if section.train_embeddings else []) + (
        list(NORM_SUFFIXES) if section.train_norms else []
    )
    return LoraConfig(
        r=section.r,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=list(section.targets),
        modules_to_save=extra or None,
        task_type="CAUSAL_LM",
    )


def check_lora_targets(model: torch.nn.Module, section: LoraSection) -> None:
    leaves = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if not any(module.children())}
    missing = [t for t in section.targets if t not in leaves]
    if missing:
        raise ConfigError(f"lora.targets: {'|'.join(missing)} not in the model; its layers: {'|'.join(sorted(leaves))}")


def add_lora(model: torch.nn.Module, section: LoraSection) -> torch.nn.Module:
    from peft import get_peft_model

    check_lora_targets(model, section)
    lora = get_peft_model(model, lora_config(section))
    # peft makes the input embeddings' output require grad when the model checkpoints; our checkpointing
    # needs no such leaf, and autograd would hold it through the step (a layer input kept on the GPU even
    # when offloaded)
    model.disable_input_require_grads()
    return lora


def patch_model(model: torch.nn.Module, recipe: Recipe, device: torch.device,
                layout: Layout | None = None) -> ModelPatch:
    """Apply attention, RoPE and RMSNorm kernels, checkpointing and MLP tiling: a line per change for the run
    log, and the undo of all of them. `layout`: the launcher's checkpointing layout (None: the recipe's explicit
    `train.checkpointing`; `auto` is the launcher's to resolve)."""
    changes, undo = [], []
    group = s2_group(recipe) if recipe.attention.train_pattern == "s2" else 0
    attn = attention_implementation(recipe.attention.backend, device, training=True, s2_group=group)
    before = model.config._attn_implementation
    model.set_attn_implementation(attn)
    changes.append(f"attention: {attn}")
    if group:
        changes.append(f"attention pattern: S²-Attn in training (causal in groups of {group} tokens, half of the heads "
                       f"shifted by {group // 2}); evaluation, generation and export use full attention")
    undo.append(lambda: model.set_attn_implementation(before))
    if device.type == "cuda":  # the kernels need a GPU; CPU runs keep transformers' own code
        from longctx.kernels.rms_norm import use_fused_rms_norm
        from longctx.kernels.rope import use_fused_rope

        for what, use in (("rope", use_fused_rope), ("rms norm", use_fused_rms_norm)):
            try:
                patch = use(model)
            except ValueError as e:  # a model family the patch does not know: said in the run log, not hidden
                changes.append(f"{what}: transformers' own code ({e})")
                continue
            changes += patch.changes
            undo.append(patch.undo)
    if layout is None:
        layout = layout_for(recipe.train.checkpointing, model.config.num_hidden_layers,
                            recipe.train.gpu_checkpoint_layers)
    memory = apply_memory_features(model, recipe, device, layout)
    return ModelPatch(changes + memory.changes, undo + [memory.undo])


def apply_memory_features(model: torch.nn.Module, recipe: Recipe, device: torch.device, layout: Layout) -> ModelPatch:
    """Checkpointing layout (host buffers pinned now, so a shortage shows at start) and tiled MLP."""
    t, config = recipe.train, model.config
    tokens = recipe.data.seq_len // recipe.parallel.sp  # per rank, between attention calls
    changes, undo = [], []
    if use_tiled_mlp(t.tiled_mlp, tokens, config.intermediate_size):
        undo.append(apply_tiled_mlp(model, t.mlp_tile_tokens))
        changes.append(f"MLP: tiles of {t.mlp_tile_tokens} tokens")
    dtype = next(model.parameters()).dtype
    if layout.host:
        require_host_memory(layout.host * layer_input_bytes(config, tokens, t.micro_batch_size, dtype.itemsize))
    handle = apply_checkpointing(model, layout)
    undo.append(handle.undo)
    handle.offloader.reserve((t.micro_batch_size, tokens, config.hidden_size), dtype, device)
    changes.append(layout.describe())
    return ModelPatch(changes, undo)


def load_model(recipe: Recipe, device: torch.device, layout: Layout | None = None, ds_config: dict | None = None,
               sp_group: ProcessGroup | None = None) -> tuple[torch.nn.Module, dict]:
    """The model ready for the engine, and a record of what was done to it: every change to the model happens
    here. `layout`, `ds_config`: the launcher's decisions (see `patch_model` and `build_model`); `sp_group`: this
    rank's sequence-parallel group, whose ranks attend under Ulysses (None: no sequence parallelism)."""
    dtype = resolve_dtype(recipe.model.dtype, device)
    config, rope_record = scaled_config(recipe)
    model = build_model(recipe, config, dtype, device, ds_config)
    changes = patch_model(model, recipe, device, layout).changes
    if recipe.lora.enabled:
        torch.manual_seed(recipe.train.seed)  # the adapters start the same however the base was built or loaded
        model = add_lora(model, recipe.lora)
        changes.append(f"lora: r={recipe.lora.r} alpha={recipe.lora.alpha} on {','.join(recipe.lora.targets)}")
    if sp_group is not None:
        changes.append(use_ulysses(model, sp_group, recipe.train.micro_batch_size))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # a ZeRO-3 partition knows its whole
    return model, {"rope": rope_record, "changes": changes, "trainable_params": trainable, "params": total}

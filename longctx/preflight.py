"""The recipe's checks that read its files: the model config, the tokenizer, the data, the checkpoint.

They run after the schema's own rules and before anything is written or loaded onto a device,
so a value that cannot run exits with code 2 and one line naming its key, as a bad key does,
instead of failing minutes later inside a rank. Only config.json and the tokenizer are read;
LoRA targets are looked up on a model built on the meta device (no memory, no weights).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from longctx.attention import attention_implementation, sliding_window
from longctx.checkpoint import check_resumable, identity, resolve_resume
from longctx.config import ConfigError, Recipe, model_dir, model_key
from longctx.corpus import check_episode_room
from longctx.curves import check_tensorboard
from longctx.data import check_records
from longctx.model import check_lora_targets, load_tokenizer, scaled_config
from longctx.rope import rope_parameters
from longctx.sequence_parallel import check_layout, model_heads

# RoPE types whose frequencies transformers picks per forward from the largest position it is given
PER_FORWARD_ROPE = ("dynamic", "longrope")


def check_inputs(recipe: Recipe, world_size: int = 1) -> Path | None:
    """Raise ConfigError, one line naming the key, for a recipe that cannot run on its files in a world of
    `world_size` ranks; else the checkpoint the run resumes from (None: it starts fresh)."""
    check_trusted(recipe)  # before transformers reads the directory: it would run the code it names
    config, rope = scaled_config(recipe)  # every RoPE rule
    check_tensorboard(recipe)
    if recipe.model.quantize == "nf4" and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("model.quantize=nf4: needs bitsandbytes, which is not installed (pip install 'longctx[qlora]')")
    # the backend must run on the device DeepSpeed will pick (DS_ACCELERATOR, else CUDA when present)
    device = os.environ.get("DS_ACCELERATOR") or ("cuda" if torch.cuda.is_available() else "cpu")
    attention_implementation(recipe.attention.backend, device, training=True)
    check_attention(config, recipe)
    check_layout(recipe.parallel.sp, world_size, recipe.data.seq_len, *model_heads(config))
    check_sequence_parallel_rope(config, recipe.parallel.sp)
    layers = config.get_text_config().num_hidden_layers
    if recipe.train.gpu_checkpoint_layers > layers:
        raise ConfigError(f"train.gpu_checkpoint_layers={recipe.train.gpu_checkpoint_layers}: the model has "
                          f"{layers} layers")
    if recipe.lora.enabled:
        with torch.device("meta"):
            check_lora_targets(AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code),
                               recipe.lora)
    try:
        tokenizer = load_tokenizer(recipe)
    except Exception as e:  # transformers raises OSError, ValueError or others for a directory it cannot read
        key = "model.tokenizer" if recipe.model.tokenizer else model_key(recipe)
        raise ConfigError(f"{key}={recipe.model.tokenizer or model_dir(recipe)!r}: no tokenizer loads from it "
                          f"({str(e).strip().splitlines()[0]})") from None
    if recipe.data.path is not None:
        check_records(recipe.data.path)
    elif recipe.data.passkey_documents:
        check_episode_room(tokenizer, recipe.data.seq_len)
    resume = resolve_resume(recipe.train.resume, Path(recipe.train.out_dir) / "checkpoints")
    if resume is not None:
        check_resumable(resume, world_size, identity(recipe, rope))
    if "needle" in recipe.eval.at_end:
        from longctx.evaluation.reports import check_needle_lengths

        check_needle_lengths(tokenizer, recipe.eval.lengths, 1, "one", "eval.lengths")
    return resume


def check_trusted(recipe: Recipe) -> None:
    """Nothing in the model directory runs as code unless the recipe says so: a config that maps the model to
    Python files in it (`auto_map`) needs model.trust_remote_code=true, and pickled weights (`*.bin`, read when
    no safetensors file is there) must unpickle as tensors and plain data, as transformers then loads them."""
    directory = Path(model_dir(recipe))
    where = f"{model_key(recipe)}={str(directory)!r}"
    auto_map = json.loads((directory / "config.json").read_text()).get("auto_map")
    if auto_map and not recipe.model.trust_remote_code:
        raise ConfigError(f"{where}: its config.json names Python code in the directory ({', '.join(auto_map.values())}); "
                          f"it runs only with model.trust_remote_code=true (allowed: true|false; default false)")
    if recipe.model.path is None or any(directory.glob("*.safetensors")):
        return
    for weights in sorted(directory.glob("*.bin")):
        try:
            torch.load(weights, map_location="meta", weights_only=True)
        except Exception as e:  # pickle.UnpicklingError for a forbidden object; others for a file that is no pickle
            reason = (str(e).strip() or type(e).__name__).splitlines()[0]
            raise ConfigError(f"{where}: {weights.name} does not load as tensors and plain data, so it is not "
                              f"loaded at all ({reason[:200]}); use safetensors weights from a source you "
                              f"trust") from None


def check_attention(config: PretrainedConfig, recipe: Recipe) -> None:
    """Our attention is full causal over each document: a model that attends within a shorter window is refused."""
    window = sliding_window(config)
    if window is not None and window < recipe.data.seq_len:
        raise ConfigError(f"{model_key(recipe)}={model_dir(recipe)!r}: the model attends within a sliding window of "
                          f"{window} tokens, shorter than data.seq_len={recipe.data.seq_len}, and longctx attention "
                          f"is full causal; "
                          f"set \"sliding_window\": null in a copy of its config.json to train it with full attention")


def check_sequence_parallel_rope(config: PretrainedConfig, sp: int) -> None:
    """dynamic and longrope choose frequencies from the largest position a forward sees; an sp rank sees only
    its shard, so ranks would rotate the same sequence differently."""
    kind = rope_parameters(config)["rope_type"]
    if sp > 1 and kind in PER_FORWARD_ROPE:
        raise ConfigError(f"parallel.sp={sp}: {kind} RoPE picks its frequencies from the positions each rank sees, "
                          f"and a sequence-parallel rank sees only its shard; use parallel.sp=1 or a fixed scaling "
                          f"(rope.method=yarn|llama3|linear|ntk|theta)")

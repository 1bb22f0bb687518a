"""Frozen base weights in 4-bit NF4 with double-quantised scales (QLoRA), through bitsandbytes.

bitsandbytes rather than torchao's NF4: peft puts LoRA on its `Linear4bit` natively, its CUDA kernels dequantize
on the GPU, and the same calls run on CPU, so the CPU tests exercise the path a GPU run takes. Only the linears of
the decoder layers are quantized; embeddings, norms and the output head keep the model's dtype.

The model is built on the meta device and materialised one block at a time in the order transformers initialises
it (embeddings, each decoder layer, the rest), each decoder layer quantized before the next exists, so the
full-precision model never exists at once. A random init is transformers' own per module, seeded by the caller: every
rank builds the same weights (not `from_config`'s numbers, whose module constructors draw from the generator too).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator, Optional

import bitsandbytes as bnb
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, PretrainedConfig

# QLoRA's format: 64 weights per scale, the scales themselves quantised to 8 bits (the planner counts these bytes)
NF4 = {"quant_type": "nf4", "compress_statistics": True, "blocksize": 64}


def quantize_linears(layer: torch.nn.Module, device: torch.device) -> None:
    """Replace every nn.Linear inside `layer` by a bitsandbytes Linear4bit holding its weight in NF4, frozen."""
    for name, linear in list(layer.named_modules()):
        if type(linear) is not torch.nn.Linear:
            continue
        parent_name, _, child = name.rpartition(".")
        quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      compute_dtype=linear.weight.dtype, compress_statistics=True, quant_type="nf4",
                                      device="meta")
        quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, module=quantized, **NF4).to(device)
        if linear.bias is not None:
            quantized.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
        quantized.register_load_state_dict_pre_hook(_load_quant_state)
        setattr(layer.get_submodule(parent_name) if parent_name else layer, child, quantized)


def _load_quant_state(module: bnb.nn.Linear4bit, state_dict: dict, prefix: str, *args) -> None:
    """A checkpoint of the module holds its quantisation state beside the packed weight (bitsandbytes'
    `_save_to_state_dict`): it becomes the module's again, and the packed weight loads as any tensor does."""
    owned = [k for k in state_dict if k.startswith(f"{prefix}weight.")]
    if owned:
        stats = {k.removeprefix(f"{prefix}weight."): state_dict.pop(k) for k in owned}
        module.weight.quant_state = module.quant_state = bnb.functional.QuantState.from_dict(stats, module.weight.device)


def dequantize(linear: bnb.nn.Linear4bit) -> torch.Tensor:
    """The weight a Linear4bit multiplies by, in its original dtype."""
    return bnb.functional.dequantize_4bit(linear.weight.data, linear.weight.quant_state)


def dequantized_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with each 4-bit weight dequantized and its quantisation state left out: what a model
    of the same architecture without quantization loads."""
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    state = {}
    for key, value in model.state_dict().items():
        owner, _, tail = key.partition(".weight")
        if owner in quantized and tail:  # absmax, quant_map, nested_*: the quantisation state
            continue
        state[key] = dequantize(quantized[owner]) if owner in quantized and key == f"{owner}.weight" else value
    return state


def _post_order(module: torch.nn.Module, name: str) -> Iterator[tuple[str, torch.nn.Module]]:
    for child_name, child in module.named_children():
        yield from _post_order(child, f"{name}.{child_name}" if name else child_name)
    yield name, module


def _checkpoint_filler(path: str, dtype: torch.dtype) -> Callable[[str, torch.nn.Module], None]:
    """Fills a module's own parameters and persistent buffers from a safetensors checkpoint, read lazily."""
    root = Path(path)
    index = root / "model.safetensors.index.json"
    where = (json.loads(index.read_text())["weight_map"] if index.is_file()
             else dict.fromkeys(safe_open(root / "model.safetensors", "pt").keys(), "model.safetensors"))
    files = {}

    def fill(name: str, module: torch.nn.Module) -> None:
        own = {**dict(module.named_parameters(recurse=False)),
               **{k: b for k, b in module.named_buffers(recurse=False) if k not in module._non_persistent_buffers_set}}
        for local, tensor in own.items():
            key = f"{name}.{local}" if name else local
            if key not in where:
                raise KeyError(f"{path}: no tensor {key} in the checkpoint")
            file = files.setdefault(where[key], safe_open(root / where[key], "pt"))
            with torch.no_grad():
                tensor.copy_(file.get_tensor(key).to(dtype))

    return fill


def build_nf4_model(config: PretrainedConfig, dtype: torch.dtype, device: torch.device,
                    weights: Optional[str]) -> torch.nn.Module:
    """The model with its decoder layers' linears in NF4: weights from the safetensors of `weights`, or a random
    init (seeded by the caller) when None. At most one decoder layer exists in `dtype` at a time."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    layers = set(model.model.layers)
    load = _checkpoint_filler(weights, dtype) if weights is not None else None

    @torch.no_grad()
    def fill(name: str, module: torch.nn.Module) -> None:
        model._init_weights(module)  # also the non-persistent buffers (RoPE frequencies) a checkpoint lacks
        if load is not None:
            load(name, module)

    # names travel down the walk: a table of modules would keep each replaced full-precision linear alive
    def materialise(name: str, module: torch.nn.Module) -> None:
        if module in layers:
            module.to_empty(device=device)
            for sub in _post_order(module, name):
                fill(*sub)
            quantize_linears(module, device)
            return
        for child_name, child in module.named_children():
            materialise(f"{name}.{child_name}" if name else child_name, child)
        tied = config.get_text_config().tie_word_embeddings and module is model.get_output_embeddings()
        if not tied:  # a tied head is the embeddings' weight, tied again below
            module.to_empty(device=device, recurse=False)
            fill(name, module)

    materialise("", model)
    model.tie_weights()
    return model

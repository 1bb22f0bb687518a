"""RoPE scaling: configs that carry every method, and what they rotate by.

A scaled config is written in transformers' own terms (`rope_parameters` in the config,
`rope_type` naming the method), so it loads in vanilla transformers and rotates exactly as
we trained; its frequencies are computed by transformers' functions. Two of our methods are not rope types of
their own: `theta` sets a new base, `ntk` (static NTK-aware) derives the base from a factor;
both are written as a plain base change, which every transformers version understands.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from longctx.config import RopeSection

METHODS = ("linear", "ntk", "dynamic", "yarn", "llama3", "longrope", "theta")
# Parameters each method accepts beyond `factor`; anything else set for it is an error.
METHOD_PARAMS = {
    "linear": (),
    "ntk": (),
    "dynamic": (),
    "yarn": ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate"),
    "llama3": ("low_freq_factor", "high_freq_factor"),
    "longrope": ("short_factor", "long_factor", "attention_factor"),
    "theta": ("theta",),
}
# RopeSection fields passed to scale_config when set
RECIPE_PARAMS = ("factor", "theta", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor",
                 "truncate", "low_freq_factor", "high_freq_factor", "short_factor", "long_factor")
LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}


class RopeError(ValueError):
    """A scaling request that cannot be honoured; the message names the parameter."""


def rope_parameters(config: PretrainedConfig) -> dict[str, Any]:
    """The config's RoPE parameters as one flat dict (5.x keeps them in `rope_parameters`)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    params.setdefault("rope_type", params.pop("type", "default"))
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(config, "rope_theta", None) or getattr(config, "default_theta", 10000.0)
    if "partial_rotary_factor" not in params and getattr(config, "partial_rotary_factor", None) is not None:
        params["partial_rotary_factor"] = config.partial_rotary_factor
    return params


def rotary_dim(config: PretrainedConfig, params: dict[str, Any] | None = None) -> int:
    """Dimensions of a head that rotate: head_dim, or its first `partial_rotary_factor` fraction."""
    params = rope_parameters(config) if params is None else params
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(head_dim * params.get("partial_rotary_factor", 1.0))


def original_context(config: PretrainedConfig, params: dict[str, Any] | None = None) -> int:
    """The context the model was pre-trained on, before any scaling.

    A config attribute `original_max_position_embeddings` (Phi-3 style) wins over the value in
    `rope_parameters`, as transformers' `standardize_rope_params` decides.
    """
    params = rope_parameters(config) if params is None else params
    return int(getattr(config, "original_max_position_embeddings", None) or params.get("original_max_position_embeddings")
               or config.max_position_embeddings)


def inv_freq(config: PretrainedConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [rotary_dim // 2], attention factor) of a config, at `seq_len` for length-dependent
    methods: transformers' own functions, so what we report is what the model rotates by."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    p = rope_parameters(config)
    kind = p["rope_type"]
    if kind == "default":  # computed inside each model's rotary module, not among the init functions
        dim = rotary_dim(config, p)
        return 1.0 / (p["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)), 1.0
    if kind not in ROPE_INIT_FUNCTIONS:
        raise RopeError(f"rope_type {kind!r}: not supported (supported: default, {', '.join(ROPE_INIT_FUNCTIONS)})")
    inv, attention = ROPE_INIT_FUNCTIONS[kind](config, "cpu", seq_len=seq_len)
    return inv.float(), float(attention)


def summary(config: PretrainedConfig) -> dict[str, Any]:
    """What a person needs to know about a model's RoPE."""
    p = rope_parameters(config)
    inv, attention = inv_freq(config)
    wavelengths = 2 * math.pi / inv
    return {
        "rope_type": p["rope_type"],
        "rope_parameters": p,
        "rotary_dim": rotary_dim(config, p),
        "original_context": original_context(config, p),
        "max_position_embeddings": config.max_position_embeddings,
        "attention_factor": attention,
        "shortest_wavelength": float(wavelengths.min()),
        "longest_wavelength": float(wavelengths.max()),
    }


def auto_method(config: PretrainedConfig) -> str:
    """yarn for an unscaled model; the model's own method where it already carries one that extends."""
    kind = rope_parameters(config)["rope_type"]
    return {"default": "yarn", "linear": "linear", "dynamic": "dynamic", "yarn": "yarn", "llama3": "llama3"}.get(kind, kind)


def _accepted(method: str) -> set[str]:
    return set(METHOD_PARAMS[method]) | ({"factor"} if method != "theta" else set())


def _short(value: Any) -> str:
    return f"[{len(value)} values]" if isinstance(value, (list, tuple)) else str(value)


def scale_config(config: PretrainedConfig, target_length: int, method: str = "auto", **params: Any) -> PretrainedConfig:
    """A copy of `config` whose RoPE reaches `target_length` with `method`; the original is untouched.

    A config that already carries a scaling is composed only where the result is the same
    method with a larger factor over the same original context (llama3, yarn, linear,
    dynamic), or a base change (`theta`, `ntk`) under the existing scaling; any other mix is
    refused, never silently replaced. A linear scaling is composed against the config's
    `max_position_embeddings`, taken as the context it already reaches (what we write).
    """
    params = {k: v for k, v in params.items() if v is not None}
    current = rope_parameters(config)
    kind = current["rope_type"]
    method = auto_method(config) if method == "auto" else method
    if method not in METHODS:
        raise RopeError(f"rope.method={method}: must be one of auto|{'|'.join(METHODS)}")
    for key, value in params.items():
        if key not in _accepted(method):
            takers = [m for m in METHODS if key in _accepted(m)]
            where = f"only applies to rope.method={'|'.join(takers)}" if takers else "is not a RoPE parameter"
            raise RopeError(f"rope.{key}={_short(value)}: {where}, not rope.method={method}")
    if params.get("factor", 1) < 1:
        raise RopeError(f"rope.factor={params['factor']}: must be >= 1 (a factor stretches the context)")
    if "longrope" in (kind, method) and kind != "default":
        raise RopeError(f"rope.method={method}: the model uses {kind} scaling; longrope factors are searched per model "
                        f"and cannot be composed with another scaling")
    composable = method in ("theta", "ntk") or method == kind or kind == "default"
    if not composable:
        raise RopeError(f"rope.method={method}: the model already uses {kind} scaling "
                        f"(factor {current.get('factor')} over {original_context(config, current)} tokens); "
                        f"extend it with rope.method={auto_method(config)} (a larger factor), theta or ntk")

    original = original_context(config, current)
    new = dict(current)
    dim = rotary_dim(config, current)
    if method == "theta":
        if "theta" not in params:
            raise RopeError("rope.method=theta: needs rope.theta, the new base frequency")
        new["rope_theta"] = float(params["theta"])
    elif method == "ntk":
        # NTK-aware: base * factor^(d/(d-2)), the base dynamic NTK (factor 1) reaches at factor x the context
        factor = float(params.get("factor") or target_length / config.max_position_embeddings)
        if factor < 1:
            raise RopeError(f"rope.target_length={target_length}: below the context {config.max_position_embeddings} "
                            f"(ntk factor {factor:.3g} < 1)")
        new["rope_theta"] = current["rope_theta"] * factor ** (dim / (dim - 2))
    else:
        factor = params.pop("factor", None)
        if factor is None and method == kind == "linear":
            # linear keeps no original context: stretch what the model reaches now by target / reach
            factor = current["factor"] * target_length / config.max_position_embeddings
        factor = float(factor or target_length / original)
        if factor < 1:
            raise RopeError(f"rope.target_length={target_length}: below the original context {original} "
                            f"(factor {factor:.3g} < 1)")
        if method == kind and factor < current["factor"]:
            raise RopeError(f"rope.method={method}: the model's own {kind} scaling has factor {current['factor']:g}; "
                            f"factor {factor:g} (target {target_length}) would shrink it. Keep it with rope.method=none, "
                            f"or set a longer rope.target_length")
        new.update(rope_type=method, factor=factor)
        if method in ("yarn", "llama3", "longrope"):
            new["original_max_position_embeddings"] = original
        if method == "llama3":
            for key, default in LLAMA3_DEFAULTS.items():
                new.setdefault(key, default)
        if method == "longrope":
            half = dim // 2
            for key in ("short_factor", "long_factor"):
                values = params.get(key)
                if values is None or len(values) != half:
                    raise RopeError(f"rope.{key}={_short(values)}: rope.method=longrope needs a list of {half} "
                                    f"factors (rotary_dim / 2)")
        new.update(params)
    scaled = copy.deepcopy(config)
    scaled.rope_parameters = new
    # dynamic NTK measures lengths against max_position_embeddings: it must stay the original context
    if new["rope_type"] != "dynamic":
        scaled.max_position_embeddings = max(int(target_length), config.max_position_embeddings)
    return scaled


def scale_from_recipe(config: PretrainedConfig, section: RopeSection,
                      default_target: int) -> tuple[PretrainedConfig, dict[str, Any]]:
    """Apply the recipe's `rope` section (a `longctx.config.RopeSection`).

    Returns the scaled config and a plain record of the effective values for the run
    directory. `method: none` leaves the config as it is; `auto` with nothing set and a target
    the model already reaches does too. Errors are `ConfigError`s naming the recipe key.
    """
    from longctx.config import ConfigError  # lazily: the config schema needs omegaconf, the math does not

    target = section.target_length or default_target
    params = {k: getattr(section, k) for k in RECIPE_PARAMS if getattr(section, k) is not None}
    before = summary(config)
    if section.method == "none":
        if section.target_length is not None:
            params = {"target_length": section.target_length, **params}
        if params:
            raise ConfigError(f"rope.{next(iter(params))}={_short(next(iter(params.values())))}: "
                              f"set but rope.method=none; choose a method")
        scaled = config
    elif section.method == "auto" and not params and target <= config.max_position_embeddings:
        scaled = config  # the model already reaches the target
    else:
        try:
            scaled = scale_config(config, target, section.method, **params)
        except RopeError as e:
            raise ConfigError(str(e)) from None
    after = before if scaled is config else summary(scaled)
    method = section.method if section.method != "auto" else f"auto -> {_method_name(scaled, config)}"
    return scaled, {
        "method": method,
        "factor": after["rope_parameters"].get("factor"),
        "original_context": before["original_context"],
        "target_length": target,
        "before": before["rope_parameters"],
        "rope_parameters": after["rope_parameters"],
        "max_position_embeddings": after["max_position_embeddings"],
        "attention_factor": after["attention_factor"],
    }


def _method_name(scaled, original) -> str:
    """What `auto` did, in recipe terms."""
    if scaled is original:
        return "none (the model already reaches the target)"
    return rope_parameters(scaled)["rope_type"]

"""Every RoPE method, as transformers computes it from the configs we write, equals its definition written out
here; scaled configs round-trip through vanilla transformers."""

import json
import math
import random

import pytest
import torch
from transformers import LlamaConfig, MistralConfig, PhiConfig, Qwen2Config

from longctx import rope
from longctx.config import ROPE_METHODS, ConfigError, RopeSection


def base_configs():
    yield LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=4096,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    yield Qwen2Config(hidden_size=192, num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=32768,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    yield MistralConfig(hidden_size=256, num_attention_heads=8, head_dim=96, max_position_embeddings=8192,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    yield PhiConfig(hidden_size=256, num_attention_heads=2, max_position_embeddings=2048,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(p: dict, dim: int, config) -> tuple[torch.Tensor, float]:
    base, factor = p["rope_theta"], p.get("factor")
    original = rope.original_context(config, p)
    if factor is None:
        factor = config.max_position_embeddings / original
    attention = p.get("attention_factor")
    if attention is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention = _yarn_mscale(factor, p["mscale"]) / _yarn_mscale(factor, p["mscale_all_dim"])
        else:
            attention = _yarn_mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def dim_for(rotations: float) -> float:  # dimension whose wavelength fits `rotations` times in the context
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_for(beta_fast), dim_for(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolated = _base_inv_freq(base, dim)
    # high-frequency dimensions (ramp 0) keep their frequency, low-frequency ones are interpolated
    inv = extrapolated / factor * ramp + extrapolated * (1 - ramp)
    return inv, float(attention)


def _llama3(p: dict, dim: int, config) -> torch.Tensor:
    inv = _base_inv_freq(p["rope_theta"], dim)
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    original = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > original / low, inv / factor, inv)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(medium, smoothed, scaled)


def _longrope(p: dict, dim: int, config, seq_len: int | None) -> tuple[torch.Tensor, float]:
    original = rope.original_context(config, p)
    factor = p.get("factor") or config.max_position_embeddings / original
    attention = p.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    ext = p["long_factor"] if seq_len and seq_len > original else p["short_factor"]
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (torch.tensor(ext, dtype=torch.float32) * p["rope_theta"] ** shape), float(attention)


def reference(config, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """The definitions written out (YaRN, Llama 3.1, LongRoPE, NTK papers), independent of transformers' code."""
    p = rope.rope_parameters(config)
    dim, kind = rope.rotary_dim(config, p), p["rope_type"]
    if kind == "default":
        return _base_inv_freq(p["rope_theta"], dim), 1.0
    if kind == "linear":
        return _base_inv_freq(p["rope_theta"], dim) / p["factor"], 1.0
    if kind == "dynamic":
        limit = config.max_position_embeddings
        length = max(seq_len or limit, limit)
        base = p["rope_theta"] * ((p["factor"] * length / limit) - (p["factor"] - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim), 1.0
    if kind == "yarn":
        return _yarn(p, dim, config)
    if kind == "llama3":
        return _llama3(p, dim, config), 1.0
    if kind == "longrope":
        return _longrope(p, dim, config, seq_len)
    raise ValueError(kind)


def assert_same(config, seq_len=None):
    ours, ours_attn = rope.inv_freq(config, seq_len)
    ref, ref_attn = reference(config, seq_len)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours.double(), ref.double(), rtol=1e-6, atol=0)
    assert ours_attn == pytest.approx(ref_attn, rel=1e-6)


def random_params(method, rng, dim):
    if method == "yarn":
        p = {"beta_fast": rng.choice([16.0, 32.0, 48.0]), "beta_slow": rng.choice([1.0, 2.0]),
             "truncate": rng.choice([True, False])}
        if rng.random() < 0.5:
            p.update(mscale=rng.uniform(0.5, 1.5), mscale_all_dim=rng.uniform(0.5, 1.5))
        return p
    if method == "llama3":
        return {"low_freq_factor": rng.choice([1.0, 2.0]), "high_freq_factor": rng.choice([4.0, 8.0])}
    if method == "longrope":
        return {"short_factor": [rng.uniform(1, 2) for _ in range(dim // 2)],
                "long_factor": [rng.uniform(1, 16) for _ in range(dim // 2)]}
    return {}


@pytest.mark.parametrize("method", ["linear", "dynamic", "yarn", "llama3", "longrope"])
@pytest.mark.parametrize("trial", range(3))
def test_each_method_equals_its_definition(method, trial):
    rng = random.Random(trial * 31 + len(method))
    for config in base_configs():
        dim = rope.rotary_dim(config)
        factor = rng.choice([2, 4, 8, 16, 3.5])
        target = int(rope.original_context(config) * factor)
        scaled = rope.scale_config(config, target, method, **random_params(method, rng, dim))
        if method in ("dynamic", "longrope"):
            original = rope.original_context(config)
            for seq_len in (None, original // 2, original, original + 1, target, 2 * target):
                assert_same(scaled, seq_len)
        else:
            assert_same(scaled)
        assert scaled.max_position_embeddings == (config.max_position_embeddings if method == "dynamic" else target)
        assert config.rope_parameters["rope_type"] == "default"  # the original is untouched


def test_theta_and_ntk_are_base_changes_under_default_rope():
    config = next(base_configs())
    dim = rope.rotary_dim(config)
    theta = rope.scale_config(config, 16384, "theta", theta=8e6)
    assert theta.rope_parameters["rope_theta"] == 8e6 and theta.rope_parameters["rope_type"] == "default"
    assert_same(theta)
    ntk = rope.scale_config(config, 16384, "ntk")
    assert ntk.rope_parameters["rope_theta"] == pytest.approx(500000.0 * 4 ** (dim / (dim - 2)))
    assert_same(ntk)
    # the static NTK base is the one dynamic NTK (factor 1) computes at the target length
    dynamic = rope.scale_config(config, 16384, "dynamic", factor=1)
    torch.testing.assert_close(rope.inv_freq(ntk)[0], rope.inv_freq(dynamic, seq_len=16384)[0])


def llama31():
    return LlamaConfig(hidden_size=256, num_attention_heads=2, max_position_embeddings=131072,
                       rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 8192})


def test_existing_llama3_scaling_is_composed_not_replaced():
    config = llama31()
    scaled = rope.scale_config(config, 524288, "auto")
    p = scaled.rope_parameters
    assert p["rope_type"] == "llama3" and p["factor"] == 64.0 and p["original_max_position_embeddings"] == 8192
    assert_same(scaled)
    theta = rope.scale_config(config, 524288, "theta", theta=4e6)
    assert theta.rope_parameters["rope_type"] == "llama3" and theta.rope_parameters["factor"] == 8.0
    assert_same(theta)
    with pytest.raises(rope.RopeError, match="already uses llama3 scaling"):
        rope.scale_config(config, 524288, "yarn")
    with pytest.raises(rope.RopeError, match="cannot be composed"):
        rope.scale_config(config, 524288, "longrope", short_factor=[1.0] * 64, long_factor=[2.0] * 64)


def test_existing_yarn_and_linear_scalings_are_extended_over_the_original_context():
    qwen = Qwen2Config(hidden_size=128, num_attention_heads=2, max_position_embeddings=32768,
                       rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "beta_fast": 16.0,
                                        "original_max_position_embeddings": 32768})
    scaled = rope.scale_config(qwen, 262144, "auto")
    p = scaled.rope_parameters
    assert p["rope_type"] == "yarn" and p["factor"] == 8.0 and p["beta_fast"] == 16.0
    assert_same(scaled)
    with pytest.raises(rope.RopeError, match="the model's own yarn scaling has factor 4; factor 2 .* would shrink it"):
        rope.scale_config(qwen, 65536, "auto")
    # linear records no original context: twice, then 4x further, is 8x in all
    base = next(base_configs())
    twice = rope.scale_config(base, 8192, "linear")
    eight = rope.scale_config(twice, 32768, "auto")
    assert eight.rope_parameters["factor"] == 8.0 and eight.max_position_embeddings == 32768
    torch.testing.assert_close(rope.inv_freq(eight)[0], rope.inv_freq(base)[0] / 8)


def test_recipe_methods_are_the_rope_methods():
    assert ROPE_METHODS == ["none", "auto", *rope.METHODS]  # the schema keeps its own list: it imports no torch


def test_parameters_that_do_not_apply_are_refused():
    config = next(base_configs())
    with pytest.raises(rope.RopeError, match="rope.beta_fast=32: only applies to rope.method=yarn, not rope.method=llama3"):
        rope.scale_config(config, 16384, "llama3", beta_fast=32)
    with pytest.raises(rope.RopeError, match=r"rope.attention_factor=1.1: only applies to rope.method=yarn\|longrope"):
        rope.scale_config(config, 16384, "linear", attention_factor=1.1)
    with pytest.raises(rope.RopeError, match="rope.method=theta: needs rope.theta"):
        rope.scale_config(config, 16384, "theta")
    with pytest.raises(rope.RopeError, match=r"rope.short_factor=\[1 values\]: rope.method=longrope needs a list of 32"):
        rope.scale_config(config, 16384, "longrope", short_factor=[1.0], long_factor=[1.0])
    with pytest.raises(rope.RopeError, match="rope.target_length=1024: below the original context 4096"):
        rope.scale_config(config, 1024, "yarn")
    with pytest.raises(rope.RopeError, match="rope.factor=0.5: must be >= 1"):
        rope.scale_config(config, 16384, "ntk", factor=0.5)


def test_auto_picks_yarn_for_an_unscaled_model_and_records_it():
    config = next(base_configs())
    scaled, record = rope.scale_from_recipe(config, RopeSection(method="auto"), default_target=32768)
    assert scaled.rope_parameters["rope_type"] == "yarn" and scaled.rope_parameters["factor"] == 8.0
    assert record["method"] == "auto -> yarn" and record["original_context"] == 4096
    assert record["attention_factor"] == pytest.approx(0.1 * math.log(8) + 1)
    same, record = rope.scale_from_recipe(config, RopeSection(method="auto"), default_target=2048)
    assert same is config and record["rope_parameters"]["rope_type"] == "default"
    with pytest.raises(ConfigError, match="rope.low_freq_factor=2.0: only applies to rope.method=llama3"):
        rope.scale_from_recipe(config, RopeSection(method="yarn", low_freq_factor=2.0), default_target=32768)


def test_method_none_leaves_the_config_alone_and_refuses_parameters():
    config = next(base_configs())
    same, record = rope.scale_from_recipe(config, RopeSection(method="none"), default_target=32768)
    assert same is config and record["method"] == "none" and record["rope_parameters"]["rope_type"] == "default"
    with pytest.raises(ConfigError, match="rope.beta_fast=8.0: set but rope.method=none"):
        rope.scale_from_recipe(config, RopeSection(method="none", beta_fast=8.0), default_target=32768)


def test_recipe_record_carries_the_effective_values():
    config = llama31()
    scaled, record = rope.scale_from_recipe(config, RopeSection(method="auto", target_length=262144), default_target=8)
    assert record["method"] == "auto -> llama3" and record["factor"] == 32.0 and record["target_length"] == 262144
    assert record["original_context"] == 8192 and record["before"]["factor"] == 8.0
    assert record["rope_parameters"] == scaled.rope_parameters and record["max_position_embeddings"] == 262144
    assert json.loads(json.dumps(record)) == record  # plain data for the run directory


def test_yarn_x4_export_reproduces_inv_freq_in_vanilla_transformers(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=128, max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    scaled = rope.scale_config(config, 4096, "yarn", beta_fast=24.0)
    AutoModelForCausalLM.from_config(scaled).save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    ours, attention = rope.inv_freq(scaled)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq.float(), ours, rtol=1e-6, atol=0)
    assert model.model.rotary_emb.attention_scaling == pytest.approx(attention)
    assert loaded.rope_parameters["factor"] == 4.0 and loaded.max_position_embeddings == 4096


def test_a_base_change_keeps_a_dynamic_models_reference_length():
    # dynamic NTK measures lengths against max_position_embeddings: a theta change must not move it
    config = rope.scale_config(next(base_configs()), 16384, "dynamic")
    theta = rope.scale_config(config, 32768, "theta", theta=config.rope_parameters["rope_theta"])
    assert theta.max_position_embeddings == config.max_position_embeddings == 4096
    for seq_len in (2048, 8192, 16384):
        torch.testing.assert_close(rope.inv_freq(theta, seq_len)[0], rope.inv_freq(config, seq_len)[0])

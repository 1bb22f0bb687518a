"""The fused RoPE kernel against the float32 reference, and models patched to use it against transformers."""

import sys

import pytest
import torch
from helpers import rel_err
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from longctx.kernels.rope import apply_rope, rope_reference, use_fused_rope

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# relative error of the kernel against the float32 reference: float32 arithmetic, or one rounding to the dtype
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim, rotary_dim", [(64, 64), (128, 128), (256, 256), (64, 32)])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 2), (3, 1)])
def test_values_and_gradients_match_the_reference(head_dim, rotary_dim, heads, kv_heads, dtype):
    seq = 9
    q = torch.randn(2, seq, heads, head_dim).to(DEVICE, dtype).requires_grad_()
    k = torch.randn(2, seq, kv_heads, head_dim).to(DEVICE, dtype).requires_grad_()
    # packed documents in the first row, a sequence-parallel shard starting at an offset in the second
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [4096, 4097, 4098, 4099, 4100, 4101, 4102, 4103, 4104]])
    positions = positions.to(DEVICE)
    inv_freq = (1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)) / 4).to(DEVICE)
    qo, ko = apply_rope(q, k, positions, inv_freq, attention_factor=1.2)
    assert qo.dtype == dtype and ko.dtype == dtype
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    torch.autograd.backward((qo, ko), (gq, gk))
    q32, k32 = (x.detach().float().requires_grad_() for x in (q, k))
    rq, rk = rope_reference(q32, k32, positions, inv_freq, 1.2)
    torch.autograd.backward((rq, rk), (gq.float(), gk.float()))
    for ours, ref in ((qo, rq), (ko, rk), (q.grad, q32.grad), (k.grad, k32.grad)):
        assert rel_err(ours, ref) < TOLERANCE[dtype]


def test_reference_is_transformers_rotate_half():
    q, k = torch.randn(1, 6, 4, 32), torch.randn(1, 6, 2, 32)
    positions = torch.arange(6)[None] + 100
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 32, 2).float() / 32))
    emb = torch.cat([positions[..., None] * inv_freq] * 2, -1)
    hq, hk = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), emb.cos(), emb.sin())
    rq, rk = rope_reference(q, k, positions, inv_freq)
    torch.testing.assert_close(rq, hq.transpose(1, 2))
    torch.testing.assert_close(rk, hk.transpose(1, 2))


ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    # positions run past max_position_embeddings: transformers recomputes the frequencies first
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
}
FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
            "mistral": (MistralConfig, MistralForCausalLM)}


def tiny_model(family, rope, dtype=torch.float32):
    config_class, model_class = FAMILIES[family]
    config = config_class(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=24, vocab_size=97, max_position_embeddings=16,
                          rope_parameters=dict(ROPES[rope]), attn_implementation="eager")
    torch.manual_seed(0)
    return model_class(config).to(DEVICE, dtype)


def logits_and_grad(model, ids, positions):
    model.zero_grad()
    logits = model(input_ids=ids, position_ids=positions).logits
    logits.float().square().mean().backward()
    return logits.detach().float(), model.model.layers[0].self_attn.q_proj.weight.grad.float().clone()


def inputs(batch=2, seq=20):
    ids = torch.randint(0, 97, (batch, seq), device=DEVICE)
    packed = torch.cat([torch.arange(7), torch.arange(seq - 7)])  # two documents
    return ids, torch.stack([packed, torch.arange(seq) + 5])[:batch].to(DEVICE)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rope", ROPES)
def test_patched_model_equals_transformers_and_undo_restores_it(family, rope):
    ids, positions = inputs()
    # a twin for the reference: a dynamic model must update its frequencies itself once patched
    ref_logits, ref_grad = logits_and_grad(tiny_model(family, rope), ids, positions)
    model = tiny_model(family, rope)
    patch = use_fused_rope(model)
    assert patch.changes == [f"rope: model.rotary_emb ({type(model.model.rotary_emb).__name__}) -> fused Triton kernel"]
    logits, grad = logits_and_grad(model, ids, positions)
    assert rel_err(logits, ref_logits) < 1e-5 and rel_err(grad, ref_grad) < 1e-5
    patch.undo()
    module = sys.modules[type(model).__module__]
    assert not hasattr(module.apply_rotary_pos_emb, "__wrapped__") and "forward" not in vars(model.model.rotary_emb)
    torch.testing.assert_close(logits_and_grad(model, ids, positions)[0], ref_logits, rtol=0, atol=0)


def test_two_patched_models_undo_independently():
    first, second = tiny_model("llama", "yarn"), tiny_model("llama", "default")
    ids, positions = inputs(batch=1, seq=8)
    ref = second(input_ids=ids, position_ids=positions).logits
    patches = use_fused_rope(first), use_fused_rope(second)
    patches[0].undo()  # the second model stays on the kernel and still computes the same
    assert rel_err(second(input_ids=ids, position_ids=positions).logits, ref) < 1e-5
    patches[1].undo()
    assert not hasattr(sys.modules[type(second).__module__].apply_rotary_pos_emb, "__wrapped__")


def test_a_model_of_another_family_is_refused_untouched():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, vocab_size=50))
    with pytest.raises(ValueError, match="the fused RoPE patch supports llama, mistral, qwen2"):
        use_fused_rope(model)
    assert not any("forward" in vars(m) for m in model.modules())


def test_bf16_patched_model_is_as_close_to_fp32_as_transformers():
    ids, positions = inputs()
    exact = tiny_model("llama", "yarn")(input_ids=ids, position_ids=positions).logits.detach()
    model = tiny_model("llama", "yarn", torch.bfloat16)
    theirs = model(input_ids=ids, position_ids=positions).logits.detach()
    patch = use_fused_rope(model)
    ours = model(input_ids=ids, position_ids=positions).logits.detach()
    patch.undo()
    assert rel_err(ours, exact) < 1.5 * rel_err(theirs, exact) + 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_long_positions_values_and_gradients(dtype):
    q = torch.randn(1, 8192, 32, 128, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(1, 8192, 8, 128, device="cuda", dtype=dtype, requires_grad=True)
    positions = torch.arange(8192, device="cuda")[None] + 120000
    inv_freq = 1.0 / (500000 ** (torch.arange(0, 128, 2, device="cuda").float() / 128))
    qo, ko = apply_rope(q, k, positions, inv_freq, 1.1)
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    torch.autograd.backward((qo, ko), (gq, gk))
    q32, k32 = (x.detach().float().requires_grad_() for x in (q, k))
    rq, rk = rope_reference(q32, k32, positions, inv_freq, 1.1)
    torch.autograd.backward((rq, rk), (gq.float(), gk.float()))
    for ours, ref in ((qo, rq), (ko, rk), (q.grad, q32.grad), (k.grad, k32.grad)):
        assert rel_err(ours, ref) < TOLERANCE[dtype]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_offsets_past_2_31_elements():
    # 540,672 tokens x 32 heads x 128: the last tokens of q start past 2**31 elements
    q = torch.randn(1, 540672, 32, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 540672, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(540672, device="cuda")[None]
    inv_freq = 1.0 / (500000 ** (torch.arange(0, 128, 2, device="cuda").float() / 128))
    qo, ko = apply_rope(q, k, positions, inv_freq)
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    torch.autograd.backward((qo, ko), (gq, gk))
    last = slice(-4096, None)
    q32, k32 = (x.detach()[:, last].float().requires_grad_() for x in (q, k))
    rq, rk = rope_reference(q32, k32, positions[:, last], inv_freq)
    torch.autograd.backward((rq, rk), (gq[:, last].float(), gk[:, last].float()))
    for name, ours, ref in [("q", qo[:, last], rq), ("k", ko[:, last], rk), ("dq", q.grad[:, last], q32.grad),
                            ("dk", k.grad[:, last], k32.grad)]:
        assert rel_err(ours, ref) < TOLERANCE[torch.bfloat16], (name, rel_err(ours, ref))

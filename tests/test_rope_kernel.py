"""The fused RoPE kernel against the float32 reference and transformers' own rotary path."""

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from longctx.kernels.rope import apply_rope, rope_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("head_dim, rotary_dim", [(64, 64), (128, 128), (256, 256), (64, 32)])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 2), (3, 1)])
def test_values_and_gradients_match_the_reference(head_dim, rotary_dim, heads, kv_heads):
    gen = torch.Generator().manual_seed(head_dim + heads)
    seq = 9
    q = torch.randn(2, seq, heads, head_dim, generator=gen).to(DEVICE).requires_grad_()
    k = torch.randn(2, seq, kv_heads, head_dim, generator=gen).to(DEVICE).requires_grad_()
    # packed documents and a shard that starts at an offset
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [4096, 4097, 4098, 4099, 4100, 4101, 4102, 4103, 4104]])
    positions = positions.to(DEVICE)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)) / 4
    inv_freq = inv_freq.to(DEVICE)
    qo, ko = apply_rope(q, k, positions, inv_freq, attention_factor=1.2)
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    (qo * gq).sum().add_((ko * gk).sum()).backward()
    q2, k2 = (x.detach().requires_grad_() for x in (q, k))
    rq, rk = rope_reference(q2, k2, positions, inv_freq, 1.2)
    (rq * gq).sum().add_((rk * gk).sum()).backward()
    for ours, ref in ((qo, rq), (ko, rk), (q.grad, q2.grad), (k.grad, k2.grad)):
        assert rel_err(ours, ref) < 1e-5


def test_reference_is_transformers_rotate_half():
    q, k = torch.randn(1, 6, 4, 32), torch.randn(1, 6, 2, 32)
    positions = torch.arange(6)[None] + 100
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 32, 2).float() / 32))
    emb = torch.cat([positions[..., None] * inv_freq] * 2, -1)
    hq, hk = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), emb.cos(), emb.sin())
    rq, rk = rope_reference(q, k, positions, inv_freq)
    torch.testing.assert_close(rq, hq.transpose(1, 2))
    torch.testing.assert_close(rk, hk.transpose(1, 2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_half_precision_at_long_positions(dtype):
    q = torch.randn(1, 8192, 32, 128, device="cuda", dtype=dtype)
    k = torch.randn(1, 8192, 8, 128, device="cuda", dtype=dtype)
    positions = torch.arange(8192, device="cuda")[None] + 120000
    inv_freq = 1.0 / (500000 ** (torch.arange(0, 128, 2, device="cuda").float() / 128))
    qo, ko = apply_rope(q, k, positions, inv_freq)
    rq, rk = rope_reference(q.float(), k.float(), positions, inv_freq)
    assert rel_err(qo, rq) < 1e-2 and rel_err(ko, rk) < 1e-2

"""Flash attention against the float64 reference: values and gradients of q, k and v.

On CPU the kernels run in Triton's interpreter at tiny shapes (fp32); on GPU at real shapes in bf16.
"""

import pytest
import torch
from helpers import rel_err

from longctx.kernels import flash_attn
from longctx.kernels.flash_attn import flash_attn_func, flash_attn_varlen_func, reference_attention

CUDA = torch.cuda.is_available()
# small cases run in fp32: in the interpreter on CPU, on the GPU with full-precision dots
DEVICE, SMALL_TOL = ("cuda", 1e-4) if CUDA else ("cpu", 1e-5)


def check(lengths_q, lengths_k, heads, kv_heads, dim, causal, dtype, device, tol):
    gen = torch.Generator(device="cpu").manual_seed(sum(lengths_q) * 7 + heads + dim + causal)
    cu_q = torch.tensor([0] + list(torch.tensor(lengths_q).cumsum(0)), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + list(torch.tensor(lengths_k).cumsum(0)), dtype=torch.int32, device=device)
    q = torch.randn(sum(lengths_q), heads, dim, generator=gen).to(device, dtype).requires_grad_()
    k = torch.randn(sum(lengths_k), kv_heads, dim, generator=gen).to(device, dtype).requires_grad_()
    v = torch.randn(sum(lengths_k), kv_heads, dim, generator=gen).to(device, dtype).requires_grad_()
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), causal=causal)
    grad = torch.randn(out.shape, generator=gen).to(device, dtype)
    out.backward(grad)
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = reference_attention(*ref_in, cu_q, cu_k, causal=causal)
    ref.backward(grad.double())
    for name, ours, theirs in [("out", out, ref), ("dq", q.grad, ref_in[0].grad), ("dk", k.grad, ref_in[1].grad),
                               ("dv", v.grad, ref_in[2].grad)]:
        assert torch.isfinite(ours).all(), name
        assert rel_err(ours, theirs) < tol, (name, rel_err(ours, theirs))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 1), (8, 1), (8, 2)])
def test_packed_documents_of_uneven_length(causal, heads, kv_heads):
    lengths = [1, 19, 6, 37, 1]  # not multiples of the block size, length-1 documents included
    check(lengths, lengths, heads, kv_heads, 32, causal, torch.float32, DEVICE, SMALL_TOL)


@pytest.mark.parametrize("dim", [16, 64])
def test_query_shorter_than_keys_aligns_the_last_query_with_the_last_key(dim):
    check([5, 3], [21, 3], 2, 1, dim, True, torch.float32, DEVICE, SMALL_TOL)


def test_batch_entry_point_equals_varlen():
    q, k, v = (torch.randn(2, 23, h, 32, device=DEVICE) for h in (4, 2, 2))
    out = flash_attn_func(q, k, v, causal=True)
    cu = torch.tensor([0, 23, 46], dtype=torch.int32, device=DEVICE)
    ref = reference_attention(q.flatten(0, 1).double(), k.flatten(0, 1).double(), v.flatten(0, 1).double(), cu, cu)
    assert rel_err(out.flatten(0, 1), ref) < SMALL_TOL


def test_inputs_that_start_off_16_bytes():
    # TMA reads need a 16-byte aligned start; views into a larger buffer may start anywhere
    lengths = [9, 14]
    cu = torch.tensor([0, 9, 23], dtype=torch.int32, device=DEVICE)
    q, k, v = (torch.randn(23 * h * 16 + 1, device=DEVICE)[1:].view(23, h, 16) for h in (2, 1, 1))
    assert q.data_ptr() % 16
    out = flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths))
    ref = reference_attention(q.double(), k.double(), v.double(), cu, cu)
    assert rel_err(out, ref) < SMALL_TOL


def test_unsupported_shapes_are_refused():
    with pytest.raises(ValueError, match="multiple of kv heads"):
        flash_attn_func(torch.randn(1, 4, 3, 32), torch.randn(1, 4, 2, 32), torch.randn(1, 4, 2, 32))
    with pytest.raises(ValueError, match="head dim 48 not supported"):
        flash_attn_func(torch.randn(1, 4, 2, 48), torch.randn(1, 4, 2, 48), torch.randn(1, 4, 2, 48))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dim, causal, heads, kv_heads",
                         [(128, True, 32, 8), (128, False, 32, 4), (128, True, 32, 32), (64, True, 32, 4)])
def test_gpu_bf16_real_shapes(dim, causal, heads, kv_heads):
    lengths = [1, 777, 4096, 2049, 130]
    check(lengths, lengths, heads, kv_heads, dim, causal, torch.bfloat16, "cuda", 1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_many_short_documents():
    # 2,100 documents x 32 heads: more programs per tile than a grid's second axis may hold (65,535)
    lengths = [1, 2, 7, 16, 31, 64, 70] * 300
    check(lengths, lengths, 32, 8, 64, True, torch.bfloat16, "cuda", 1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_offsets_past_2_31_elements():
    # 264 documents of 2,048 tokens x 32 heads x 128: the last ones start past 2**31 elements of q, k and v
    lengths = [2048] * 264
    total = sum(lengths)
    assert total * 32 * 128 > 2**31
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(total, 32, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = flash_attn_varlen_func(q, k, v, cu, cu, 2048, 2048)
    grad = torch.randn_like(out)
    out.backward(grad)
    last = slice(total - 2048, total)
    ref_in = [x.detach()[last].double().requires_grad_() for x in (q, k, v)]
    one = torch.tensor([0, 2048], device="cuda", dtype=torch.int32)
    ref = reference_attention(*ref_in, one, one)
    ref.backward(grad[last].double())
    for name, ours, theirs in [("out", out[last], ref), ("dq", q.grad[last], ref_in[0].grad),
                               ("dk", k.grad[last], ref_in[1].grad), ("dv", v.grad[last], ref_in[2].grad)]:
        assert rel_err(ours, theirs) < 1e-2, (name, rel_err(ours, theirs))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or torch.cuda.get_device_capability()[0] != 9, reason="needs a Hopper GPU")
@pytest.mark.parametrize("dim, causal, kv_heads", [(128, True, 8), (128, False, 4), (64, True, 32)])
def test_gpu_hopper_backward_equals_the_triton_kernel(dim, causal, kv_heads, monkeypatch):
    lengths = [1, 777, 4096, 2049, 130]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(dim + kv_heads)
    make = lambda h: torch.randn(sum(lengths), h, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    q, k, v, grad = make(32), make(kv_heads), make(kv_heads), make(32)
    assert flash_attn.uses_hopper_backward(q)
    assert not any(flash_attn.uses_hopper_backward(q.to(dtype)) for dtype in (torch.half, torch.float))

    def grads():
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        flash_attn_varlen_func(*leaves, cu, cu, max(lengths), max(lengths), causal=causal).backward(grad)
        return [x.grad for x in leaves]

    hopper = grads()
    monkeypatch.setattr(flash_attn.host, "uses_hopper_backward", lambda q: False)
    for name, ours, triton_kernel in zip(("dq", "dk", "dv"), hopper, grads()):
        assert rel_err(ours, triton_kernel) < 1e-3, (name, rel_err(ours, triton_kernel))

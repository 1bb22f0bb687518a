"""Flash attention's entry points and autograd: checks, buffers, and which kernels run (`triton_kernels`, or
`hopper` for the backward where it applies)."""

from __future__ import annotations

import math

import torch

from . import triton_kernels

LOG2E = 1.4426950408889634


def uses_hopper_backward(q: torch.Tensor) -> bool:
    """Whether the backward runs in the warp-specialised Gluon kernels: Hopper, bf16, head dim 64 or 128."""
    if not (q.is_cuda and torch.cuda.get_device_capability(q.device)[0] == 9 and q.dtype == torch.bfloat16):
        return False
    from . import hopper  # Gluon's Hopper API is imported only on Hopper
    return q.shape[-1] in hopper.WS_HEAD_DIMS


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 3 or k.shape != v.shape or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"expected q (tokens, heads, dim) and k, v (tokens, kv_heads, dim); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} must be a multiple of kv heads {k.shape[1]}")
    if q.shape[-1] not in triton_kernels.HEAD_DIMS:
        raise ValueError(f"head dim {q.shape[-1]} not supported (supported: {triton_kernels.HEAD_DIMS})")


def _tma_ready(x: torch.Tensor) -> torch.Tensor:
    """Contiguous and starting on 16 bytes, as TMA needs (a view into a larger buffer may start anywhere)."""
    x = x.contiguous()
    return x if x.data_ptr() % 16 == 0 else x.clone()


class _FlashAttnVarlen(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        _check(q, k, v)
        q, k, v = _tma_ready(q), _tma_ready(k), _tma_ready(v)
        o = torch.empty_like(q)
        lse = torch.empty((q.shape[1], q.shape[0]), device=q.device, dtype=torch.float32)
        triton_kernels.forward(q, k, v, o, lse, cu_q, cu_k, max_q, max_k, causal, scale * LOG2E)
        ctx.save_for_backward(q, k, v, o, lse, cu_q, cu_k)
        ctx.meta = (max_q, max_k, causal, scale)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu_q, cu_k = ctx.saved_tensors
        max_q, max_k, causal, scale = ctx.meta
        do = _tma_ready(do)
        delta = torch.empty_like(lse)
        triton_kernels.backward_delta(o, do, delta)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        if uses_hopper_backward(q):
            from . import hopper
            kernels = hopper
        else:
            kernels = triton_kernels
        kernels.backward(q, k, v, do, lse, delta, dq, dk, dv, cu_q, cu_k, max_q, max_k, causal, scale, scale * LOG2E)
        return dq, dk, dv, None, None, None, None, None, None


def flash_attn_varlen_func(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
    causal: bool = True, softmax_scale: float | None = None,
) -> torch.Tensor:
    """Attention over packed sequences: q (total_q, heads, dim), k/v (total_k, kv_heads, dim)."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return _FlashAttnVarlen.apply(q, k, v, cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32),
                                  int(max_seqlen_q), int(max_seqlen_k), causal, scale)


def flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    softmax_scale: float | None = None) -> torch.Tensor:
    """Attention over a batch: q (batch, seq_q, heads, dim), k/v (batch, seq_k, kv_heads, dim)."""
    batch, seq_q, heads, dim = q.shape
    seq_k = k.shape[1]
    cu_q = torch.arange(0, (batch + 1) * seq_q, seq_q, device=q.device, dtype=torch.int32)
    cu_k = torch.arange(0, (batch + 1) * seq_k, seq_k, device=q.device, dtype=torch.int32)
    out = flash_attn_varlen_func(q.reshape(batch * seq_q, heads, dim), k.reshape(batch * seq_k, -1, dim),
                                 v.reshape(batch * seq_k, -1, dim), cu_q, cu_k, seq_q, seq_k, causal, softmax_scale)
    return out.view(batch, seq_q, heads, dim)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                        cu_seqlens_k: torch.Tensor, causal: bool = True, softmax_scale: float | None = None) -> torch.Tensor:
    """Plain torch, explicit mask, per sequence, in the inputs' dtype (use float64 for references)."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    group = q.shape[1] // k.shape[1]
    out = torch.zeros_like(q)
    for b in range(cu_seqlens_q.numel() - 1):
        qs, qe, ks, ke = (int(x) for x in (cu_seqlens_q[b], cu_seqlens_q[b + 1], cu_seqlens_k[b], cu_seqlens_k[b + 1]))
        qb = q[qs:qe].transpose(0, 1)
        kb = k[ks:ke].repeat_interleave(group, dim=1).transpose(0, 1)
        vb = v[ks:ke].repeat_interleave(group, dim=1).transpose(0, 1)
        scores = qb @ kb.transpose(1, 2) * scale
        if causal:
            lq, lk = qe - qs, ke - ks
            visible = torch.arange(lq, device=q.device)[:, None] + (lk - lq) >= torch.arange(lk, device=q.device)[None, :]
            scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows that see no key output zeros
        out[qs:qe] = (probs @ vb).transpose(0, 1)
    return out

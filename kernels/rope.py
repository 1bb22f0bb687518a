"""Fused RoPE: rotates q and k in one launch, cos/sin computed on the fly from inv_freq and positions.

No (seq x dim) cos/sin cache exists: each program computes the angles of its token from its
position id, so packed documents and sequence-parallel shards (positions starting anywhere)
cost nothing extra. Rotate-half convention of transformers: for the first `rotary_dim` dims,
x1 = x[:r/2], x2 = x[r/2:r]; out = (x1 cos - x2 sin, x2 cos + x1 sin) * attention_factor;
dims past `rotary_dim` (partial rotary) pass through. Backward is the inverse rotation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate(X, Y, token, s_xt, s_xh, s_yt, s_yh, cos, sin, n_heads, head_dim, half,
            BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    ok = (heads < n_heads) & (dims < half)
    x_row = X + token * s_xt + heads * s_xh
    y_row = Y + token * s_yt + heads * s_yh
    x1 = tl.load(x_row + dims, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + half + dims, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_row + dims, (x1 * cos - x2 * sin).to(Y.dtype.element_ty), mask=ok)
    tl.store(y_row + half + dims, (x2 * cos + x1 * sin).to(Y.dtype.element_ty), mask=ok)
    if BLOCK_REST > 0:  # partial rotary: copy the dimensions RoPE does not touch
        rest = 2 * half + tl.arange(0, BLOCK_REST)[None, :]
        keep = (heads < n_heads) & (rest < head_dim)
        tl.store(y_row + rest, tl.load(x_row + rest, mask=keep, other=0.0), mask=keep)


@triton.jit
def _rope_kernel(Q, K, QO, KO, POS, INV_FREQ, attention_factor, sign,
                 s_qt, s_qh, s_kt, s_kh, s_qot, s_qoh, s_kot, s_koh,
                 q_heads, k_heads, head_dim, half,
                 BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr):
    token = tl.program_id(0)
    pos = tl.load(POS + token).to(tl.float32)
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    freq = tl.load(INV_FREQ + dims, mask=dims < half, other=0.0)
    angle = pos * freq
    cos = tl.cos(angle) * attention_factor
    sin = tl.sin(angle) * attention_factor * sign  # sign -1: the inverse rotation, for backward
    _rotate(Q, QO, token, s_qt, s_qh, s_qot, s_qoh, cos, sin, q_heads, head_dim, half, BLOCK_QH, BLOCK_HALF, BLOCK_REST)
    _rotate(K, KO, token, s_kt, s_kh, s_kot, s_koh, cos, sin, k_heads, head_dim, half, BLOCK_KH, BLOCK_HALF, BLOCK_REST)


def _launch(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
            attention_factor: float, sign: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q (tokens, heads, dim), k (tokens, kv_heads, dim) with unit stride in dim -> rotated copies."""
    tokens, q_heads, head_dim = q.shape
    half = inv_freq.numel()
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    rest = head_dim - 2 * half
    _rope_kernel[(tokens,)](
        q, k, qo, ko, positions, inv_freq, float(attention_factor), sign,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), qo.stride(0), qo.stride(1), ko.stride(0), ko.stride(1),
        q_heads, k.shape[1], head_dim, half,
        BLOCK_QH=triton.next_power_of_2(q_heads), BLOCK_KH=triton.next_power_of_2(k.shape[1]),
        BLOCK_HALF=triton.next_power_of_2(half), BLOCK_REST=triton.next_power_of_2(rest) if rest else 0,
        num_warps=4,
    )
    return qo, ko


class _FusedRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, positions, inv_freq, attention_factor):
        ctx.save_for_backward(positions, inv_freq)  # nothing of q or k: backward rotates the gradient
        ctx.attention_factor = attention_factor
        return _launch(q, k, positions, inv_freq, attention_factor, 1.0)

    @staticmethod
    def backward(ctx, dq, dk):
        positions, inv_freq = ctx.saved_tensors
        dq, dk = _launch(dq.contiguous(), dk.contiguous(), positions, inv_freq, ctx.attention_factor, -1.0)
        return dq, dk, None, None, None


def apply_rope(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor,
               attention_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (batch, seq, heads, dim) and k (batch, seq, kv_heads, dim) at `position_ids` (batch, seq)."""
    b, s, h, d = q.shape
    if 2 * inv_freq.numel() > d:
        raise ValueError(f"inv_freq has {inv_freq.numel()} frequencies: rotary dim {2 * inv_freq.numel()} > head dim {d}")
    positions = position_ids.expand(b, s).reshape(-1).contiguous()
    qo, ko = _FusedRope.apply(q.reshape(b * s, h, d).contiguous(), k.reshape(b * s, -1, d).contiguous(), positions,
                              inv_freq.float().contiguous(), attention_factor)
    return qo.view(q.shape), ko.view(k.shape)


def rope_reference(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor,
                   attention_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch in float32: transformers' rotate-half with cos/sin built from inv_freq."""
    half = inv_freq.numel()
    angle = position_ids[..., None].float() * inv_freq.float()  # (batch, seq, half)
    cos, sin = (torch.cos(angle) * attention_factor)[:, :, None], (torch.sin(angle) * attention_factor)[:, :, None]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2, rest = x[..., :half].float(), x[..., half:2 * half].float(), x[..., 2 * half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest.float()], -1).to(x.dtype)

    return rotate(q), rotate(k)

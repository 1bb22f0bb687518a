"""Fused RoPE: rotates q and k in one launch, cos/sin computed on the fly from inv_freq and positions.

No (seq x dim) cos/sin cache exists: each program computes the angles of its token from its
position id, so packed documents and sequence-parallel shards (positions starting anywhere)
cost nothing extra. Rotate-half convention of transformers: for the first `rotary_dim` dims,
x1 = x[:r/2], x2 = x[r/2:r]; out = (x1 cos - x2 sin, x2 cos + x1 sin) * attention_factor;
dims past `rotary_dim` (partial rotary) pass through. Backward is the inverse rotation.

`use_fused_rope(model)` makes a transformers Llama / Qwen2 / Mistral model rotate through
this kernel instead of its cos/sin path, and gives back a handle that undoes it.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from typing import Callable

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.runtime.interpreter import InterpretedFunction

from .patch import ModelPatch


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
                 BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr,
                 LIBDEVICE_TRIG: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)  # tokens x (heads x dim) passes 2**31 past 524,288 tokens of 32 x 128
    pos = tl.load(POS + token).to(tl.float32)
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    freq = tl.load(INV_FREQ + dims, mask=dims < half, other=0.0)
    angle = pos * freq  # the same float32 product transformers forms
    # Angles reach ~1e5 rad at long positions. libdevice's cosf/sinf reduce them exactly, as
    # torch.cos does; hardware approximations would not. The interpreter has no libdevice.
    if LIBDEVICE_TRIG:
        cos, sin = libdevice.cos(angle), libdevice.sin(angle)
    else:
        cos, sin = tl.cos(angle), tl.sin(angle)
    cos = cos * attention_factor
    sin = sin * attention_factor * sign  # sign -1: the inverse rotation, for backward
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
        LIBDEVICE_TRIG=not isinstance(_rope_kernel, InterpretedFunction),
        num_warps=4,
    )
    return qo, ko


class _FusedRope(torch.autograd.Function):
    # Out of place in both directions. Forward: transformers hands us q and k as views of the
    # projections, and autograd refuses a two-output Function that modifies views in place.
    # Backward: an incoming gradient may be a tensor the caller still holds.
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
    """Rotate q (batch, seq, heads, dim) and k (batch, seq, kv_heads, dim) at `position_ids` (batch or 1, seq)."""
    b, s, h, d = q.shape
    if 2 * inv_freq.numel() > d:
        raise ValueError(f"inv_freq has {inv_freq.numel()} frequencies: rotary dim {2 * inv_freq.numel()} > head dim {d}")
    q, k = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k))  # the kernel reads head dims with unit stride
    positions = position_ids.expand(b, s).reshape(-1).contiguous()
    qo, ko = _FusedRope.apply(q.reshape(b * s, h, d), k.reshape(b * s, -1, d), positions,
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


# transformers modules whose attention calls the module's own `apply_rotary_pos_emb(q, k, cos, sin)`
# on q and k laid out (batch, heads, seq, head_dim), with cos/sin from one `*RotaryEmbedding`
SUPPORTED_MODELS = {
    "transformers.models.llama.modeling_llama": "llama",
    "transformers.models.qwen2.modeling_qwen2": "qwen2",
    "transformers.models.mistral.modeling_mistral": "mistral",
}


@dataclass(frozen=True)
class Rotation:
    """What a patched rotary module hands the attention layers in place of (cos, sin)."""

    position_ids: torch.Tensor
    inv_freq: torch.Tensor
    attention_factor: float


def _rotation(rotary: torch.nn.Module, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[Rotation, Rotation]:
    # both halves of the (cos, sin) pair: the attention unpacks two values and passes both on
    rotation = Rotation(position_ids, rotary.inv_freq, float(rotary.attention_scaling))
    return rotation, rotation


def _dispatcher(original: Callable) -> Callable:
    """`apply_rotary_pos_emb` that runs the kernel for a Rotation and the original for real cos/sin."""

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if not isinstance(cos, Rotation):
            return original(q, k, cos, sin, unsqueeze_dim)
        if unsqueeze_dim != 1:
            raise ValueError(f"fused RoPE expects q and k as (batch, heads, seq, dim); got unsqueeze_dim={unsqueeze_dim}")
        # transformers' q and k are (batch, seq, heads, dim) projections seen transposed: no copy either way
        qo, ko = apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos.position_ids, cos.inv_freq, cos.attention_factor)
        return qo.transpose(1, 2), ko.transpose(1, 2)

    apply_rotary_pos_emb.__wrapped__ = original
    apply_rotary_pos_emb.users = 0
    return apply_rotary_pos_emb


def _install_dispatcher(module: types.ModuleType) -> Callable[[], None]:
    """Route the module's `apply_rotary_pos_emb` through the dispatcher; returns the undo for one user."""
    current = module.apply_rotary_pos_emb
    dispatcher = current if hasattr(current, "users") else _dispatcher(current)
    module.apply_rotary_pos_emb = dispatcher
    dispatcher.users += 1

    def release() -> None:
        dispatcher.users -= 1
        if dispatcher.users == 0:  # the last patched model of this family is back: restore the function
            module.apply_rotary_pos_emb = dispatcher.__wrapped__

    return release


def use_fused_rope(model: torch.nn.Module) -> ModelPatch:
    """Make a transformers Llama / Qwen2 / Mistral model apply RoPE with the fused kernel.

    Each rotary module then returns the positions and its own inverse frequencies (after
    transformers' dynamic / longrope update, so every rope type behaves as before) instead of
    cos/sin tables, and the model family's `apply_rotary_pos_emb` sends those to the kernel.
    Models of other families raise: we never leave a model on the slow path without a word.
    """
    from transformers.modeling_rope_utils import dynamic_rope_update

    rotaries = [(name, m) for name, m in model.named_modules() if type(m).__name__.endswith("RotaryEmbedding")]
    if not rotaries:
        raise ValueError(f"{type(model).__name__}: no rotary embedding module found to patch")
    for name, rotary in rotaries:  # all checked before anything changes
        if type(rotary).__module__ not in SUPPORTED_MODELS:
            raise ValueError(f"{name}: {type(rotary).__name__} from {type(rotary).__module__}; the fused RoPE patch "
                             f"supports {', '.join(sorted(SUPPORTED_MODELS.values()))}")
    forward = dynamic_rope_update(_rotation)
    changes, undo = [], []
    for name, rotary in rotaries:
        rotary.forward = types.MethodType(forward, rotary)
        undo.append(lambda rotary=rotary: delattr(rotary, "forward"))
        undo.append(_install_dispatcher(sys.modules[type(rotary).__module__]))
        changes.append(f"rope: {name or 'model'} ({type(rotary).__name__}) -> fused Triton kernel")
    return ModelPatch(changes, undo)

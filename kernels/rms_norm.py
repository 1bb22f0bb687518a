"""Fused RMSNorm: one launch forward, one backward, saving the input in its own dtype.

transformers' RMSNorm upcasts its input to float32 and autograd keeps that copy for backward:
4 bytes per element where the input itself has 2, in every norm of every layer (the largest
part of what a tiled-MLP layer saves at long sequences). This kernel keeps the bf16 input and
one float32 1/rms per token, and recomputes the rest in backward. The forward rounds exactly
where transformers does: y = weight * (x * rstd, rounded to x's dtype).

`use_fused_rms_norm(model)` routes the RMSNorm modules of a Llama / Qwen2 / Mistral model
through the kernel and gives back a handle that undoes it.
"""

from __future__ import annotations

import types
from typing import Callable

import torch
import triton
import triton.language as tl

from .patch import ModelPatch


@triton.jit
def _rms_norm_fwd(X, W, Y, RSTD, stride_x, stride_y, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # rows x hidden passes 2**31 past 524,288 tokens of 4096
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(RSTD + row, rstd)
    normed = (x * rstd).to(Y.dtype.element_ty).to(tl.float32)  # transformers rounds before the weight
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (w * normed).to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _rms_norm_bwd(DY, X, W, RSTD, DX, DW_PART, stride_dy, stride_x, stride_dx, n_rows, n_cols, rows_per_program,
                  WEIGHT_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_program  # the loop's rows are int64, as in the forward
    for row in range(first, tl.minimum(first + rows_per_program, n_rows)):
        x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = x * rstd
        g = dy * w
        # d/dx of x * rstd(x): rstd * (g - xhat * mean(g * xhat))
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / n_cols))
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=ok)
        if WEIGHT_GRAD:
            dw += dy * xhat
    if WEIGHT_GRAD:
        tl.store(DW_PART + pid * n_cols + cols, dw, mask=ok)


def _rows(x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


class _FusedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rows = _rows(x)
        n_rows, n_cols = rows.shape
        y = torch.empty_like(rows)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(n_cols)
        _rms_norm_fwd[(n_rows,)](rows, weight, y, rstd, rows.stride(0), y.stride(0), n_cols, eps,
                                 BLOCK=block, num_warps=min(16, max(1, block // 256)))
        ctx.save_for_backward(rows, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        rows, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = rows.shape
        dy_rows = _rows(dy)
        dx = torch.empty_like(rows)
        weight_grad = ctx.needs_input_grad[1]
        # a few programs per SM, each over a run of rows, so the weight gradient is a short sum of partials
        programs = min(n_rows, 4 * _sm_count(rows.device))
        per_program = triton.cdiv(n_rows, programs)
        programs = triton.cdiv(n_rows, per_program)
        dw_part = torch.empty(programs if weight_grad else 1, n_cols, dtype=torch.float32, device=rows.device)
        block = triton.next_power_of_2(n_cols)
        _rms_norm_bwd[(programs,)](dy_rows, rows, weight, rstd, dx, dw_part, dy_rows.stride(0), rows.stride(0),
                                   dx.stride(0), n_rows, n_cols, per_program, WEIGHT_GRAD=weight_grad,
                                   BLOCK=block, num_warps=min(16, max(1, block // 256)))
        dw = dw_part.sum(0).to(weight.dtype) if weight_grad else None
        return dx.view(dy.shape), dw, None


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / sqrt(mean(x^2) + eps)) over the last dimension, as transformers' RMSNorm."""
    return _FusedRMSNorm.apply(x, weight, eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Plain torch in x's dtype (use float32 or float64 for a reference)."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


SUPPORTED_NORMS = {
    "transformers.models.llama.modeling_llama": "LlamaRMSNorm",
    "transformers.models.qwen2.modeling_qwen2": "Qwen2RMSNorm",
    "transformers.models.mistral.modeling_mistral": "MistralRMSNorm",
}


def _fused_forward(norm: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, norm.weight, norm.variance_epsilon)


def use_fused_rms_norm(model: torch.nn.Module) -> ModelPatch:
    """Route every RMSNorm of a transformers Llama / Qwen2 / Mistral model through the kernel.
    Other families raise: a model is never left on the slow path without a word."""
    norms = [(name, m) for name, m in model.named_modules() if type(m).__name__.endswith("RMSNorm")]
    if not norms:
        raise ValueError(f"{type(model).__name__}: no RMSNorm module found to patch")
    for name, norm in norms:  # all checked before anything changes
        if SUPPORTED_NORMS.get(type(norm).__module__) != type(norm).__name__:
            raise ValueError(f"{name}: {type(norm).__name__} from {type(norm).__module__}; the fused RMSNorm patch "
                             f"supports {', '.join(sorted(SUPPORTED_NORMS.values()))}")
    undo: list[Callable[[], None]] = []
    for _, norm in norms:
        norm.forward = types.MethodType(_fused_forward, norm)
        undo.append(lambda norm=norm: delattr(norm, "forward"))
    return ModelPatch([f"rms norm: {len(norms)} {type(norms[0][1]).__name__} modules -> fused Triton kernel"],
                             undo)

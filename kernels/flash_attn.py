"""Flash attention in Triton: forward and backward, causal or not, GQA, packed documents.

One kernel family serves both entry points: `flash_attn_varlen_func` takes packed tokens
(total, heads, dim) with cumulative sequence lengths; `flash_attn_func` (batch, seq, heads,
dim) is the varlen case with equal lengths. Grouped-query attention reads each k/v head for
its group of query heads; k and v are never repeated in memory. Causal masking aligns the
last query with the last key (as the flash-attn package does when lengths differ). On Hopper
the backward of bf16 inputs of head dim 64 or 128 runs in Gluon kernels instead: the same
arithmetic, warp-specialised.

Softmax runs in base 2: scores are multiplied by scale * log2(e), and the saved
log-sum-exp is in the same units, so backward recomputes probabilities with one exp2.
The log-sum-exp (and backward's row sums of dO * O) are stored (heads, tokens): a tile of
rows reads them as one contiguous run.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonTensorDescriptor
from triton.tools.tensor_descriptor import TensorDescriptor

LOG2E = 1.4426950408889634
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _row_offsets(rows, stride):
    """Element offsets of token rows as a column, in int64: tokens x (heads x dim) passes 2**31 past
    524,288 tokens of 32 x 128."""
    return rows.to(tl.int64)[:, None] * stride


@triton.jit
def _key_range(pid_m, len_q, len_k, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(hi, full): the keys query tile pid_m (rows of BLOCK_M) reads, in blocks of BLOCK_N. Blocks below
    `full` are seen whole by every row of the tile; [full, hi) may cross the diagonal or the end.
    Causal: query i sees keys <= i + len_k - len_q."""
    shift = len_k - len_q
    hi = len_k
    full = len_k // BLOCK_N * BLOCK_N
    if CAUSAL:
        hi = tl.minimum(len_k, (pid_m + 1) * BLOCK_M + shift)
        full = tl.minimum(full, tl.maximum(0, (pid_m * BLOCK_M + shift + 1) // BLOCK_N * BLOCK_N))
    return hi, full


@triton.jit
def _query_range(pid_n, len_q, len_k, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(lo, diag, full): the query rows that read key block pid_n (keys of BLOCK_N), in steps of BLOCK_M.
    Rows [lo, diag) may cross the diagonal, [diag, full) see the whole block, [full, len_q) run past the end."""
    shift = len_k - len_q
    lo = 0
    diag = 0
    if CAUSAL:  # queries before the block's first key minus the shift see none of it
        lo = tl.maximum(0, (pid_n * BLOCK_N - shift) // BLOCK_M * BLOCK_M)
        diag = tl.minimum(len_q, lo + tl.maximum(0, pid_n * BLOCK_N + BLOCK_N - 1 - shift - lo + BLOCK_M - 1)
                          // BLOCK_M * BLOCK_M)
    full = tl.maximum(diag, len_q // BLOCK_M * BLOCK_M)
    return lo, diag, full


@triton.jit
def _fwd_blocks(q, KD, VD, k0, hk, m_i, l_i, acc, scale_log2, lo, hi, len_k, shift, offs_m, offs_n,
                MASKED: tl.constexpr, CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                PREC: tl.constexpr):
    """Online softmax over key blocks [lo, hi); MASKED blocks may cross the diagonal or the end."""
    for start in range(lo, hi, BLOCK_N):
        k = KD.load([k0 + start, hk * D])
        v = VD.load([k0 + start, hk * D])
        qk = tl.dot(q, tl.trans(k), input_precision=PREC)
        if MASKED:  # keys past the end belong to the next sequence (or are zeros past the last): masked out
            cols = start + offs_n
            keep = (cols < len_k)[None, :]
            if CAUSAL:
                keep = keep & (offs_m[:, None] + shift >= cols[None, :])
            s = tl.where(keep, qk * scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
            p = tl.exp2(s - m_safe[:, None])
        else:
            # every row sees every column, so the max is finite; scale and shift fuse into one FMA
            m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)
            m_safe = m_new
            p = tl.exp2(qk * scale_log2 - m_new[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _fwd_kernel(
    Q, KD, VD, O, LSE, CU_Q, CU_K, max_q, scale_log2, s_qt, s_qh, s_ot, s_oh, s_lh,
    H: tl.constexpr, GROUP: tl.constexpr, CAUSAL: tl.constexpr,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):
    # A flat grid (no axis limit on sequences x heads), query tiles fastest. Causal: the last query tiles see
    # the most keys, so they start first and the light ones fill the tail.
    tiles = tl.cdiv(max_q, BLOCK_M)
    pid_m, bh = tiles - 1 - tl.program_id(0) % tiles, tl.program_id(0) // tiles
    b, h = bh // H, bh % H
    hk = h // GROUP
    q0, k0 = tl.load(CU_Q + b), tl.load(CU_K + b)
    len_q, len_k = tl.load(CU_Q + b + 1) - q0, tl.load(CU_K + b + 1) - k0
    if pid_m * BLOCK_M >= len_q:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < len_q
    q = tl.load(Q + _row_offsets(q0 + offs_m, s_qt) + h * s_qh + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    shift = len_k - len_q  # query i sees keys <= i + shift
    hi, full = _key_range(pid_m, len_q, len_k, CAUSAL, BLOCK_M, BLOCK_N)
    m_i, l_i, acc = _fwd_blocks(q, KD, VD, k0, hk, m_i, l_i, acc, scale_log2, 0, full, len_k, shift, offs_m, offs_n,
                                False, CAUSAL, D, BLOCK_N, PREC)
    m_i, l_i, acc = _fwd_blocks(q, KD, VD, k0, hk, m_i, l_i, acc, scale_log2, full, hi, len_k, shift, offs_m, offs_n,
                                True, CAUSAL, D, BLOCK_N, PREC)
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    # +inf for rows that see no key: backward then recomputes probability 0 for them
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    tl.store(O + _row_offsets(q0 + offs_m, s_ot) + h * s_oh + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(LSE + h * s_lh + q0 + offs_m, lse, mask=row_ok)


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, s_ot, s_oh, s_dt, s_dh, s_lh, total, D: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    h = tl.program_id(1)
    ok = rows < total
    offs_d = tl.arange(0, D)
    o = tl.load(O + _row_offsets(rows, s_ot) + h * s_oh + offs_d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + _row_offsets(rows, s_dt) + h * s_dh + offs_d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + h * s_lh + rows, tl.sum(o * do, 1), mask=ok)


@triton.jit
def _dkdv_rows(QD, DOD, LSE, DELTA, k, v, dk, dv, q0, h, s_lh, scale_log2, lo, hi, len_q, shift, offs_m, offs_n,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
               PREC: tl.constexpr):
    """dk, dv of one key block from query rows [lo, hi); MASKED rows may cross the diagonal or the end.
    Rows past the end (the next sequence's, or zeros) get lse = +inf, so p = 0 there. Key columns past
    the end need no mask: they only feed dk/dv rows that are never stored."""
    for start in range(lo, hi, BLOCK_M):
        rows = start + offs_m
        q = QD.load([q0 + start, h * D])
        do = DOD.load([q0 + start, h * D])
        if MASKED:
            row_ok = rows < len_q
            lse = tl.load(LSE + h * s_lh + q0 + rows, mask=row_ok, other=float("inf"))
            delta = tl.load(DELTA + h * s_lh + q0 + rows, mask=row_ok, other=0.0)
        else:
            lse = tl.load(LSE + h * s_lh + q0 + rows)
            delta = tl.load(DELTA + h * s_lh + q0 + rows)
        s_t = tl.dot(k, tl.trans(q), input_precision=PREC) * scale_log2  # (N, M)
        p_t = tl.exp2(s_t - lse[None, :])
        if MASKED and CAUSAL:
            p_t = tl.where(rows[None, :] + shift >= offs_n[:, None], p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PREC)
    return dk, dv


@triton.jit
def _dkdv_tile(QD, K, V, DOD, LSE, DELTA, DK, DV, pid_n, hk, q0, k0, len_q, len_k, scale_log2, scale,
               s_kt, s_kh, s_vt, s_vh, s_lh, s_dkt, s_dkh, s_dvt, s_dvh,
               GROUP: tl.constexpr, CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    """dk and dv of one key block, summed over the query heads that read its k/v head."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    col_ok = offs_n < len_k
    k = tl.load(K + _row_offsets(k0 + offs_n, s_kt) + hk * s_kh + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(V + _row_offsets(k0 + offs_n, s_vt) + hk * s_vh + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    shift = len_k - len_q
    lo, diag, full = _query_range(pid_n, len_q, len_k, CAUSAL, BLOCK_M, BLOCK_N)
    for g in range(GROUP):
        h = hk * GROUP + g
        dk, dv = _dkdv_rows(QD, DOD, LSE, DELTA, k, v, dk, dv, q0, h, s_lh, scale_log2, lo, diag, len_q, shift,
                            offs_m, offs_n, True, CAUSAL, D, BLOCK_M, PREC)
        dk, dv = _dkdv_rows(QD, DOD, LSE, DELTA, k, v, dk, dv, q0, h, s_lh, scale_log2, diag, full, len_q, shift,
                            offs_m, offs_n, False, CAUSAL, D, BLOCK_M, PREC)
        dk, dv = _dkdv_rows(QD, DOD, LSE, DELTA, k, v, dk, dv, q0, h, s_lh, scale_log2, full, len_q, len_q, shift,
                            offs_m, offs_n, True, CAUSAL, D, BLOCK_M, PREC)
    tl.store(DK + _row_offsets(k0 + offs_n, s_dkt) + hk * s_dkh + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=col_ok[:, None])
    tl.store(DV + _row_offsets(k0 + offs_n, s_dvt) + hk * s_dvh + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=col_ok[:, None])


@triton.jit
def _dq_blocks(K, V, q, do, lse, delta, dq, k0, hk, s_kt, s_kh, s_vt, s_vh, scale_log2, lo, hi, len_k, shift,
               offs_m, offs_n, offs_d, MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
               PREC: tl.constexpr):
    """dq of one query tile from key blocks [lo, hi); rows past the end carry lse = +inf, so p = 0 there."""
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        if MASKED:
            col_ok = cols < len_k
            k = tl.load(K + _row_offsets(k0 + cols, s_kt) + hk * s_kh + offs_d[None, :], mask=col_ok[:, None],
                        other=0.0)
            v = tl.load(V + _row_offsets(k0 + cols, s_vt) + hk * s_vh + offs_d[None, :], mask=col_ok[:, None],
                        other=0.0)
        else:
            k = tl.load(K + _row_offsets(k0 + cols, s_kt) + hk * s_kh + offs_d[None, :])
            v = tl.load(V + _row_offsets(k0 + cols, s_vt) + hk * s_vh + offs_d[None, :])
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
        p = tl.exp2(s - lse[:, None])
        if MASKED:
            keep = col_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_m[:, None] + shift >= cols[None, :])
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)
    return dq


@triton.jit
def _dq_tile(Q, K, V, DO, LSE, DELTA, DQ, pid_m, h, hk, q0, k0, len_q, len_k, scale_log2, scale,
             s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_dt, s_dh, s_lh, s_dqt, s_dqh,
             CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    """dq of one query tile, recomputing its probabilities."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < len_q
    q = tl.load(Q + _row_offsets(q0 + offs_m, s_qt) + h * s_qh + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + _row_offsets(q0 + offs_m, s_dt) + h * s_dh + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + h * s_lh + q0 + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + h * s_lh + q0 + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    shift = len_k - len_q
    hi, full = _key_range(pid_m, len_q, len_k, CAUSAL, BLOCK_M, BLOCK_N)
    dq = _dq_blocks(K, V, q, do, lse, delta, dq, k0, hk, s_kt, s_kh, s_vt, s_vh, scale_log2, 0, full, len_k, shift,
                    offs_m, offs_n, offs_d, False, CAUSAL, BLOCK_N, PREC)
    dq = _dq_blocks(K, V, q, do, lse, delta, dq, k0, hk, s_kt, s_kh, s_vt, s_vh, scale_log2, full, hi, len_k, shift,
                    offs_m, offs_n, offs_d, True, CAUSAL, BLOCK_N, PREC)
    tl.store(DQ + _row_offsets(q0 + offs_m, s_dqt) + h * s_dqh + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None])


# One launch does both halves of the backward, on a flat grid like the forward's. Per sequence x kv head, the
# first programs each take a key block (dk, dv over the group's query heads), the rest a query tile of one head
# (dq), so the two halves share the GPU and neither leaves a tail. dq recomputes the probabilities: adding each key
# block's dq share into float32 instead costs about all of a backward's time (BENCHMARKS.md, bench/dq_reduction.py).
# What bounds this kernel is the softmax arithmetic waiting on each wgmma. On Hopper, bf16 with head dim 64 or 128
# takes the `_ws_` kernels below instead: the same two halves, warp-specialised in Gluon (bitwise the same gradients
# at the first tile sizes of AUTOTUNE); this kernel serves everything else.
@triton.jit
def _bwd_kernel(
    Q, K, V, DO, QD, DOD, LSE, DELTA, DQ, DK, DV, CU_Q, CU_K, max_q, max_k, scale_log2, scale,
    s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_dt, s_dh, s_lh, s_dqt, s_dqh, s_dkt, s_dkh, s_dvt, s_dvh,
    HK: tl.constexpr, GROUP: tl.constexpr, CAUSAL: tl.constexpr, D: tl.constexpr,
    BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr, PREC: tl.constexpr,
):
    key_blocks = tl.cdiv(max_k, BLOCK_N1)
    tiles = key_blocks + GROUP * tl.cdiv(max_q, BLOCK_M2)
    pid, bh = tl.program_id(0) % tiles, tl.program_id(0) // tiles
    b, hk = bh // HK, bh % HK
    q0, k0 = tl.load(CU_Q + b), tl.load(CU_K + b)
    len_q, len_k = tl.load(CU_Q + b + 1) - q0, tl.load(CU_K + b + 1) - k0
    if pid < key_blocks:  # causal: the first key blocks are seen by the most queries, so they start first
        if pid * BLOCK_N1 < len_k:
            _dkdv_tile(QD, K, V, DOD, LSE, DELTA, DK, DV, pid, hk, q0, k0, len_q, len_k, scale_log2, scale,
                       s_kt, s_kh, s_vt, s_vh, s_lh, s_dkt, s_dkh, s_dvt, s_dvh,
                       GROUP, CAUSAL, D, BLOCK_M1, BLOCK_N1, PREC)
    else:  # the heads of a group side by side (they read the same k/v), the last query tiles first
        tile = pid - key_blocks
        pid_m = (tiles - key_blocks) // GROUP - 1 - tile // GROUP
        if pid_m * BLOCK_M2 < len_q:
            _dq_tile(Q, K, V, DO, LSE, DELTA, DQ, pid_m, hk * GROUP + tile % GROUP, hk, q0, k0, len_q, len_k,
                     scale_log2, scale, s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_dt, s_dh, s_lh, s_dqt, s_dqh,
                     CAUSAL, D, BLOCK_M2, BLOCK_N2, PREC)


# The backward on Hopper, warp-specialised in Gluon: the same mathematics as `_bwd_kernel`, scheduled
# by hand, for bf16 of head dim 64 or 128 on compute capability 9.x (the shapes its GPU tests ran).
#
# Two kernels, one per half of the backward: dk/dv (one program per key block) and dq (one program per
# query tile). In each program one warp loads tiles by TMA into a ring of shared-memory stages, and two
# warpgroups compute, each on its own half of the block, releasing a stage once its matrix products are
# done. Nothing makes the two warpgroups wait for each other, so the exponentials of one run beside the
# other's matrix products, where in `_bwd_kernel` every warp meets at barriers around each tile load and
# the tensor cores idle while all of them exponentiate. Within a warpgroup, dP's product runs on while the
# probabilities are formed (dq) and dV's while dS is formed (dk/dv). Keeping a tile's last product in
# flight into the next tile needed more registers than the warpgroups have: ptxas then serialises every
# product.
WS_HEAD_DIMS = (64, 128)
# (rows per step, rows per program, stages): dk/dv steps over query rows, dq over keys
WS_DKDV_TILES = (64, 128, 3)
WS_DQ_TILES = (64, 128, 3)
# registers per thread: a program holds three warpgroups, two computing and one whose first warp loads
WS_LOADER_REGS = gl.constexpr(24)
WS_COMPUTE_REGS = gl.constexpr(240)


@triton.constexpr_function
def _ws_mma_layout(cols):
    """Layout of one warpgroup's product with `cols` columns (rows: 16 per warp, 4 warps)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, cols, 16])


@triton.constexpr_function
def _ws_operand_layout(d):
    """Layout of a left operand taken from registers, for a product with `d` columns."""
    return gl.DotOperandLayout(operand_index=0, parent=_ws_mma_layout(d), k_width=2)


@gluon.jit
def _ws_load_ring(desc_a, desc_b, smem_a, smem_b, ready, free, row0, col, lo, hi, it,
                  STEP: gl.constexpr, STAGES: gl.constexpr):
    """The loading warp: tiles of two tensors at rows [lo, hi) of the sequence into the ring."""
    for start in range(lo, hi, STEP):
        s = it % STAGES
        mbarrier.wait(free.index(s), ((it // STAGES) & 1) ^ 1)  # a fresh barrier passes parity 1
        mbarrier.expect(ready.index(s), desc_a.block_type.nbytes + desc_b.block_type.nbytes)
        tma.async_copy_global_to_shared(desc_a, [row0 + start, col], ready.index(s), smem_a.index(s))
        tma.async_copy_global_to_shared(desc_b, [row0 + start, col], ready.index(s), smem_b.index(s))
        it += 1
    return it


@gluon.jit
def _ws_stage(held_a_desc, held_b_desc, ring_a_desc, ring_b_desc, row, col, HELD: gl.constexpr, STEP: gl.constexpr,
              D: gl.constexpr, STAGES: gl.constexpr):
    """Shared memory of a program: two tiles of HELD rows it keeps (loaded here, from `row`), a ring of
    STAGES pairs of STEP-row tiles, and the barriers: `held_ready`, and per stage `ready` (loaded) and
    `free` (both computing warpgroups are done with it)."""
    held_a = gl.allocate_shared_memory(held_a_desc.dtype, [HELD, D], held_a_desc.layout)
    held_b = gl.allocate_shared_memory(held_b_desc.dtype, [HELD, D], held_b_desc.layout)
    ring_a = gl.allocate_shared_memory(ring_a_desc.dtype, [STAGES, STEP, D], ring_a_desc.layout)
    ring_b = gl.allocate_shared_memory(ring_b_desc.dtype, [STAGES, STEP, D], ring_b_desc.layout)
    held_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(held_ready, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(free.index(i), count=2)  # one arrival per computing warpgroup
    mbarrier.expect(held_ready, held_a_desc.block_type.nbytes + held_b_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(held_a_desc, [row, col], held_ready, held_a)
    tma.async_copy_global_to_shared(held_b_desc, [row, col], held_ready, held_b)
    return held_a, held_b, ring_a, ring_b, held_ready, ready, free


@gluon.jit
def _ws_dkdv_loader(q_desc, do_desc, q_smem, do_smem, ready, free, q0, hk, lo, len_q,
                    GROUP: gl.constexpr, D: gl.constexpr, STEP: gl.constexpr, STAGES: gl.constexpr):
    it = 0
    for g in range(GROUP):
        it = _ws_load_ring(q_desc, do_desc, q_smem, do_smem, ready, free, q0, (hk * GROUP + g) * D, lo, len_q, it,
                           STEP, STAGES)


@gluon.jit
def _ws_dkdv_steps(k_half, v_half, q_smem, do_smem, ready, free, LSE, DELTA, dk, dv, zero, keys, it, h, q0, s_lh,
                   scale_log2, lo, hi, len_q, shift, MASKED: gl.constexpr, CAUSAL: gl.constexpr, STEP: gl.constexpr,
                   STAGES: gl.constexpr, s_layout: gl.constexpr, op_layout: gl.constexpr):
    """One warpgroup's dk, dv over query rows [lo, hi); MASKED rows may cross the diagonal or the end
    (rows past the end get lse = +inf, so p = 0 there)."""
    dtype: gl.constexpr = q_smem.dtype
    for start in range(lo, hi, STEP):
        s = it % STAGES
        rows = start + gl.arange(0, STEP, gl.SliceLayout(0, s_layout))
        if MASKED:
            lse = gl.load(LSE + h * s_lh + q0 + rows, mask=rows < len_q, other=float("inf"))
            delta = gl.load(DELTA + h * s_lh + q0 + rows, mask=rows < len_q, other=0.0)
        else:
            lse = gl.load(LSE + h * s_lh + q0 + rows)
            delta = gl.load(DELTA + h * s_lh + q0 + rows)
        mbarrier.wait(ready.index(s), (it // STAGES) & 1)
        q = q_smem.index(s)
        do = do_smem.index(s)
        s_t = warpgroup_mma(k_half, q.permute((1, 0)), zero, use_acc=False, is_async=True)
        s_t = warpgroup_mma_wait(0, deps=(s_t,))
        p_t = gl.exp2(s_t * scale_log2 - lse[None, :])
        if MASKED and CAUSAL:
            p_t = gl.where(rows[None, :] + shift >= keys[:, None], p_t, 0.0)
        dp_t = warpgroup_mma(v_half, do.permute((1, 0)), zero, use_acc=False, is_async=True)
        dv = warpgroup_mma(gl.convert_layout(p_t.to(dtype), op_layout), do, dv, is_async=True)
        dp_t = warpgroup_mma_wait(1, deps=(dp_t,))  # dv's product runs on while dS is formed
        ds_t = p_t * (dp_t - delta[None, :])
        dk = warpgroup_mma(gl.convert_layout(ds_t.to(dtype), op_layout), q, dk, is_async=True)
        dk, dv = warpgroup_mma_wait(0, deps=(dk, dv))
        mbarrier.arrive(free.index(s), count=1)  # one thread per warpgroup, after the warpgroup's products
        it += 1
    return dk, dv, it


@gluon.jit
def _ws_dkdv_compute(k_smem, v_smem, q_smem, do_smem, kv_ready, ready, free, LSE, DELTA, DK, DV,
                     q0, k0, hk, pid_n, len_q, len_k, lo, diag, full, scale_log2, scale, s_lh, s_dkt, s_dkh, s_dvt,
                     s_dvh, WG: gl.constexpr, GROUP: gl.constexpr, CAUSAL: gl.constexpr, D: gl.constexpr,
                     STEP: gl.constexpr, BLOCK: gl.constexpr, STAGES: gl.constexpr):
    """Warpgroup WG's half of the key block: dk and dv summed over the group's query heads."""
    HALF: gl.constexpr = BLOCK // 2
    s_layout: gl.constexpr = _ws_mma_layout(STEP)
    o_layout: gl.constexpr = _ws_mma_layout(D)
    op_layout: gl.constexpr = _ws_operand_layout(D)
    k_half = k_smem.slice(WG * HALF, HALF)
    v_half = v_smem.slice(WG * HALF, HALF)
    dk = gl.zeros([HALF, D], gl.float32, o_layout)
    dv = gl.zeros([HALF, D], gl.float32, o_layout)
    zero = gl.zeros([HALF, STEP], gl.float32, s_layout)  # the scores' accumulator, unused (use_acc=False)
    keys = pid_n * BLOCK + WG * HALF + gl.arange(0, HALF, gl.SliceLayout(1, s_layout))
    shift = len_k - len_q
    mbarrier.wait(kv_ready, 0)
    it = 0
    for g in range(GROUP):
        h = hk * GROUP + g
        dk, dv, it = _ws_dkdv_steps(k_half, v_half, q_smem, do_smem, ready, free, LSE, DELTA, dk, dv, zero, keys, it,
                                    h, q0, s_lh, scale_log2, lo, diag, len_q, shift, True, CAUSAL, STEP, STAGES,
                                    s_layout, op_layout)
        dk, dv, it = _ws_dkdv_steps(k_half, v_half, q_smem, do_smem, ready, free, LSE, DELTA, dk, dv, zero, keys, it,
                                    h, q0, s_lh, scale_log2, diag, full, len_q, shift, False, CAUSAL, STEP, STAGES,
                                    s_layout, op_layout)
        dk, dv, it = _ws_dkdv_steps(k_half, v_half, q_smem, do_smem, ready, free, LSE, DELTA, dk, dv, zero, keys, it,
                                    h, q0, s_lh, scale_log2, full, len_q, len_q, shift, True, CAUSAL, STEP, STAGES,
                                    s_layout, op_layout)
    rows = pid_n * BLOCK + WG * HALF + gl.arange(0, HALF, gl.SliceLayout(1, o_layout))
    cols = gl.arange(0, D, gl.SliceLayout(0, o_layout))[None, :]
    keep = (rows < len_k)[:, None]
    tokens = (k0 + rows).to(gl.int64)[:, None]
    gl.store(DK + tokens * s_dkt + hk * s_dkh + cols, (dk * scale).to(DK.dtype.element_ty), mask=keep)
    gl.store(DV + tokens * s_dvt + hk * s_dvh + cols, dv.to(DV.dtype.element_ty), mask=keep)


@gluon.jit
def _ws_dkdv_kernel(q_desc, do_desc, k_desc, v_desc, LSE, DELTA, DK, DV, CU_Q, CU_K, max_k, scale_log2, scale,
                    s_lh, s_dkt, s_dkh, s_dvt, s_dvh,
                    HK: gl.constexpr, GROUP: gl.constexpr, CAUSAL: gl.constexpr, D: gl.constexpr,
                    STEP: gl.constexpr, BLOCK: gl.constexpr, STAGES: gl.constexpr):
    # grid as the Triton kernel's dk/dv half: key blocks fastest, the first (seen by most queries) first
    key_blocks = gl.cdiv(max_k, BLOCK)
    pid_n = gl.program_id(0) % key_blocks
    bh = gl.program_id(0) // key_blocks
    b = bh // HK
    hk = bh % HK
    q0 = gl.load(CU_Q + b)
    k0 = gl.load(CU_K + b)
    len_q = gl.load(CU_Q + b + 1) - q0
    len_k = gl.load(CU_K + b + 1) - k0
    if pid_n * BLOCK < len_k:
        lo, diag, full = _query_range(pid_n, len_q, len_k, CAUSAL, STEP, BLOCK)
        k_smem, v_smem, q_smem, do_smem, kv_ready, ready, free = _ws_stage(
            k_desc, v_desc, q_desc, do_desc, k0 + pid_n * BLOCK, hk * D, BLOCK, STEP, D, STAGES)
        # Gluon passes a partition's arguments as written here: tuples built elsewhere lose their constexprs
        gl.warp_specialize([
            (_ws_dkdv_compute, (k_smem, v_smem, q_smem, do_smem, kv_ready, ready, free, LSE, DELTA, DK, DV, q0, k0,
                                hk, pid_n, len_q, len_k, lo, diag, full, scale_log2, scale, s_lh, s_dkt, s_dkh, s_dvt,
                                s_dvh, 0, GROUP, CAUSAL, D, STEP, BLOCK, STAGES)),
            (_ws_dkdv_compute, (k_smem, v_smem, q_smem, do_smem, kv_ready, ready, free, LSE, DELTA, DK, DV, q0, k0,
                                hk, pid_n, len_q, len_k, lo, diag, full, scale_log2, scale, s_lh, s_dkt, s_dkh, s_dvt,
                                s_dvh, 1, GROUP, CAUSAL, D, STEP, BLOCK, STAGES)),
            (_ws_dkdv_loader, (q_desc, do_desc, q_smem, do_smem, ready, free, q0, hk, lo, len_q,
                               GROUP, D, STEP, STAGES)),
        ], [4, 1], [WS_COMPUTE_REGS, WS_LOADER_REGS])


@gluon.jit
def _ws_dq_steps(q_half, do_half, k_smem, v_smem, ready, free, dq, zero, lse, delta, rows, it, scale_log2, lo, hi,
                 len_k, shift, MASKED: gl.constexpr, CAUSAL: gl.constexpr, STEP: gl.constexpr, STAGES: gl.constexpr,
                 s_layout: gl.constexpr, op_layout: gl.constexpr):
    """One warpgroup's dq over key blocks [lo, hi); MASKED blocks may cross the diagonal or the end."""
    dtype: gl.constexpr = k_smem.dtype
    for start in range(lo, hi, STEP):
        s = it % STAGES
        mbarrier.wait(ready.index(s), (it // STAGES) & 1)
        k = k_smem.index(s)
        v = v_smem.index(s)
        qk = warpgroup_mma(q_half, k.permute((1, 0)), zero, use_acc=False, is_async=True)
        dp = warpgroup_mma(do_half, v.permute((1, 0)), zero, use_acc=False, is_async=True)
        qk = warpgroup_mma_wait(1, deps=(qk,))  # dP's product runs on while P is formed
        p = gl.exp2(qk * scale_log2 - lse[:, None])
        if MASKED:
            cols = start + gl.arange(0, STEP, gl.SliceLayout(0, s_layout))
            keep = (cols < len_k)[None, :]
            if CAUSAL:
                keep = keep & (rows[:, None] + shift >= cols[None, :])
            p = gl.where(keep, p, 0.0)
        dp = warpgroup_mma_wait(0, deps=(dp,))
        ds = p * (dp - delta[:, None])
        dq = warpgroup_mma(gl.convert_layout(ds.to(dtype), op_layout), k, dq, is_async=True)
        dq = warpgroup_mma_wait(0, deps=(dq,))
        mbarrier.arrive(free.index(s), count=1)
        it += 1
    return dq, it


@gluon.jit
def _ws_dq_compute(q_smem, do_smem, k_smem, v_smem, qdo_ready, ready, free, LSE, DELTA, DQ, q0, h, pid_m, len_q, len_k,
                   full, hi, scale_log2, scale, s_lh, s_dqt, s_dqh,
                   WG: gl.constexpr, CAUSAL: gl.constexpr, D: gl.constexpr, STEP: gl.constexpr, BLOCK: gl.constexpr,
                   STAGES: gl.constexpr):
    """Warpgroup WG's half of the query tile: its dq, recomputing the probabilities."""
    HALF: gl.constexpr = BLOCK // 2
    s_layout: gl.constexpr = _ws_mma_layout(STEP)
    o_layout: gl.constexpr = _ws_mma_layout(D)
    op_layout: gl.constexpr = _ws_operand_layout(D)
    rows = pid_m * BLOCK + WG * HALF + gl.arange(0, HALF, gl.SliceLayout(1, s_layout))
    lse = gl.load(LSE + h * s_lh + q0 + rows, mask=rows < len_q, other=float("inf"))
    delta = gl.load(DELTA + h * s_lh + q0 + rows, mask=rows < len_q, other=0.0)
    dq = gl.zeros([HALF, D], gl.float32, o_layout)
    zero = gl.zeros([HALF, STEP], gl.float32, s_layout)  # the scores' accumulator, unused (use_acc=False)
    shift = len_k - len_q
    mbarrier.wait(qdo_ready, 0)
    q_half = q_smem.slice(WG * HALF, HALF)
    do_half = do_smem.slice(WG * HALF, HALF)
    dq, it = _ws_dq_steps(q_half, do_half, k_smem, v_smem, ready, free, dq, zero, lse, delta, rows, gl.to_tensor(0),
                          scale_log2, 0, full, len_k, shift, False, CAUSAL, STEP, STAGES, s_layout, op_layout)
    dq, it = _ws_dq_steps(q_half, do_half, k_smem, v_smem, ready, free, dq, zero, lse, delta, rows, it,
                          scale_log2, full, hi, len_k, shift, True, CAUSAL, STEP, STAGES, s_layout, op_layout)
    out_rows = pid_m * BLOCK + WG * HALF + gl.arange(0, HALF, gl.SliceLayout(1, o_layout))
    cols = gl.arange(0, D, gl.SliceLayout(0, o_layout))[None, :]
    tokens = (q0 + out_rows).to(gl.int64)[:, None]
    gl.store(DQ + tokens * s_dqt + h * s_dqh + cols, (dq * scale).to(DQ.dtype.element_ty),
             mask=(out_rows < len_q)[:, None])


@gluon.jit
def _ws_dq_loader(k_desc, v_desc, k_smem, v_smem, ready, free, k0, hk, hi,
                  D: gl.constexpr, STEP: gl.constexpr, STAGES: gl.constexpr):
    _ws_load_ring(k_desc, v_desc, k_smem, v_smem, ready, free, k0, hk * D, 0, hi, gl.to_tensor(0), STEP, STAGES)


@gluon.jit
def _ws_dq_kernel(q_desc, do_desc, k_desc, v_desc, LSE, DELTA, DQ, CU_Q, CU_K, max_q, scale_log2, scale,
                  s_lh, s_dqt, s_dqh,
                  HK: gl.constexpr, GROUP: gl.constexpr, CAUSAL: gl.constexpr, D: gl.constexpr,
                  STEP: gl.constexpr, BLOCK: gl.constexpr, STAGES: gl.constexpr):
    # grid as the Triton kernel's dq half: the heads of a group side by side (they read the same k/v),
    # the last query tiles (which see the most keys) first
    tiles = GROUP * gl.cdiv(max_q, BLOCK)
    tile = gl.program_id(0) % tiles
    bh = gl.program_id(0) // tiles
    b = bh // HK
    hk = bh % HK
    pid_m = tiles // GROUP - 1 - tile // GROUP
    h = hk * GROUP + tile % GROUP
    q0 = gl.load(CU_Q + b)
    k0 = gl.load(CU_K + b)
    len_q = gl.load(CU_Q + b + 1) - q0
    len_k = gl.load(CU_K + b + 1) - k0
    if pid_m * BLOCK < len_q:
        hi, full = _key_range(pid_m, len_q, len_k, CAUSAL, BLOCK, STEP)
        q_smem, do_smem, k_smem, v_smem, qdo_ready, ready, free = _ws_stage(
            q_desc, do_desc, k_desc, v_desc, q0 + pid_m * BLOCK, h * D, BLOCK, STEP, D, STAGES)
        gl.warp_specialize([
            (_ws_dq_compute, (q_smem, do_smem, k_smem, v_smem, qdo_ready, ready, free, LSE, DELTA, DQ, q0, h, pid_m,
                              len_q, len_k, full, hi, scale_log2, scale, s_lh, s_dqt, s_dqh,
                              0, CAUSAL, D, STEP, BLOCK, STAGES)),
            (_ws_dq_compute, (q_smem, do_smem, k_smem, v_smem, qdo_ready, ready, free, LSE, DELTA, DQ, q0, h, pid_m,
                              len_q, len_k, full, hi, scale_log2, scale, s_lh, s_dqt, s_dqh,
                              1, CAUSAL, D, STEP, BLOCK, STAGES)),
            (_ws_dq_loader, (k_desc, v_desc, k_smem, v_smem, ready, free, k0, hk, hi, D, STEP, STAGES)),
        ], [4, 1], [WS_COMPUTE_REGS, WS_LOADER_REGS])


HEAD_DIMS = (16, 32, 64, 128, 256)
# Tiles tried per kernel on GPUs, chosen once per (head dim, causal, group) and longest sequence rounded
# up to a power of two, since many short documents want smaller tiles than one long sequence; a tile
# that does not fit the chip is dropped. Forward: (BLOCK_M queries, BLOCK_N keys, warps, stages).
# Backward: (BLOCK_M1 query rows per step, BLOCK_N1 keys per dk/dv program, BLOCK_M2 queries per dq
# program, BLOCK_N2 keys per step, warps, stages). The first entries won sweeps on an H100 at 32K
# tokens, 32/8 heads, dim 128 (backward: 7 tiles, 54 to 81 ms); the last is small enough in shared
# memory for head dim 256. Widen the lists again to retune for another chip.
AUTOTUNE = {
    "fwd": [(128, 64, 8, 3), (128, 128, 8, 3), (64, 32, 4, 2)],
    "bwd": [(64, 128, 128, 64, 8, 3), (32, 64, 64, 32, 4, 4), (32, 32, 32, 32, 4, 2)],
}
TILE_NAMES = {"fwd": ("BLOCK_M", "BLOCK_N"), "bwd": ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")}
# Untuned tiles, (size of every tile, warps, stages); tiles change speed only, never results.
# One small tile keeps the interpreter fast on CPU. fp32 inputs (tests, references) get true fp32
# dots on CUDA cores, where large tiles take minutes to compile, and fp32 is never a speed path.
FIXED_TILES = {"interpret": (16, 1, 1), "fp32": (32, 4, 2)}
# The inner loops of the forward and of the dk/dv half read their tiles by TMA: the forward 10-12% faster
# on an H100, the backward up to 5%. The dq half keeps plain loads of k/v: by TMA too, it was no faster
# there. Each descriptor's tile has the rows of the tile size named here, set once the tiles are chosen.
DESCRIPTOR_ROWS = {"fwd": {"KD": "BLOCK_N", "VD": "BLOCK_N"},
                   "bwd": {"QD": "BLOCK_M1", "DOD": "BLOCK_M1"}}


def _descriptor(x: torch.Tensor) -> TensorDescriptor:
    """x (tokens, heads, dim) as a (tokens, heads * dim) TMA descriptor; one head's rows make a tile.
    Rows past the last token read as zeros."""
    tokens, heads, dim = x.shape
    return TensorDescriptor(x.view(tokens, heads * dim), [tokens, heads * dim], [heads * dim, 1], [1, dim])


def _size_descriptors(name: str, args: dict) -> None:
    for arg, tile in DESCRIPTOR_ROWS[name].items():
        args[arg].block_shape = [args[tile], args[arg].block_shape[1]]


@functools.cache
def _tuned(name: str, tiles: str | int):
    """The autotuner of one kernel for one length bucket (it keys on the arguments named, not on lengths),
    or, for a FIXED_TILES name, the kernel with that one tile (a single config is never timed)."""
    if isinstance(tiles, str):
        size, warps, stages = FIXED_TILES[tiles]
        choices = [(size,) * len(TILE_NAMES[name]) + (warps, stages)]
    else:
        choices = AUTOTUNE[name]
    configs = [triton.Config(dict(zip(TILE_NAMES[name], c[:-2])), num_warps=c[-2], num_stages=c[-1],
                             pre_hook=lambda args, name=name: _size_descriptors(name, args))
               for c in choices]
    return triton.autotune(configs, key=["D", "CAUSAL", "GROUP"])(KERNELS[name])


KERNELS = {"fwd": _fwd_kernel, "bwd": _bwd_kernel}


def uses_hopper_backward(q: torch.Tensor) -> bool:
    """Whether the backward runs in the warp-specialised Gluon kernels: Hopper, bf16, head dim 64 or 128."""
    return (q.is_cuda and torch.cuda.get_device_capability(q.device)[0] == 9 and q.dtype == torch.bfloat16
            and q.shape[-1] in WS_HEAD_DIMS)


def _ws_descriptor(x: torch.Tensor, rows: int) -> GluonTensorDescriptor:
    """`_descriptor(x)` for the Gluon kernels: tiles of `rows` rows, in their shared-memory layout."""
    flat = _descriptor(x)
    block = [rows, x.shape[-1]]
    return GluonTensorDescriptor(flat.base, flat.shape, flat.strides, block,
                                 gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16))


def _ws_backward(q, k, v, do, lse, delta, dq, dk, dv, cu_q, cu_k, max_q: int, max_k: int, causal: bool,
                 scale: float, scale_log2: float) -> None:
    """Fills dq, dk, dv (shaped as q, k, v). lse and delta: (heads, tokens) float32, base-2 log-sum-exp
    and the row sums of dO * O."""
    heads, dim = q.shape[1:]
    kv_heads, batch = k.shape[1], cu_q.numel() - 1
    group = heads // kv_heads
    # at launch the three warpgroups share the register file evenly; setmaxnreg then moves registers to the two
    # computing ones
    meta = dict(HK=kv_heads, GROUP=group, CAUSAL=causal, D=dim, num_warps=4, maxnreg=65536 // (3 * 128) // 8 * 8)
    step, block, stages = WS_DKDV_TILES
    _ws_dkdv_kernel[(triton.cdiv(max_k, block) * batch * kv_heads,)](
        _ws_descriptor(q, step), _ws_descriptor(do, step), _ws_descriptor(k, block), _ws_descriptor(v, block),
        lse, delta, dk, dv, cu_q, cu_k, max_k, scale_log2, scale,
        lse.stride(0), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        STEP=step, BLOCK=block, STAGES=stages, **meta)
    step, block, stages = WS_DQ_TILES
    _ws_dq_kernel[(group * triton.cdiv(max_q, block) * batch * kv_heads,)](
        _ws_descriptor(q, block), _ws_descriptor(do, block), _ws_descriptor(k, step), _ws_descriptor(v, step),
        lse, delta, dq, cu_q, cu_k, max_q, scale_log2, scale, lse.stride(0), dq.stride(0), dq.stride(1),
        STEP=step, BLOCK=block, STAGES=stages, **meta)


def _launch(name: str, grid, longest: int, *args, **kwargs) -> None:
    """grid: tile sizes (a dict by name) -> the launch grid; longest: the longest sequence, for the tiles."""
    fixed = "interpret" if INTERPRET else "fp32" if kwargs["PREC"] == "ieee" else None
    _tuned(name, fixed or triton.next_power_of_2(longest))[grid](*args, **kwargs)


def _precision(q: torch.Tensor) -> str:
    # fp32 inputs get true fp32 products; bf16/fp16 use the tensor cores as they are
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 3 or k.shape != v.shape or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"expected q (tokens, heads, dim) and k, v (tokens, kv_heads, dim); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} must be a multiple of kv heads {k.shape[1]}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"head dim {q.shape[-1]} not supported (supported: {HEAD_DIMS})")


def _tma_ready(x: torch.Tensor) -> torch.Tensor:
    """Contiguous and starting on 16 bytes, as TMA needs (a view into a larger buffer may start anywhere)."""
    x = x.contiguous()
    return x if x.data_ptr() % 16 == 0 else x.clone()


class _FlashAttnVarlen(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        _check(q, k, v)
        q, k, v = _tma_ready(q), _tma_ready(k), _tma_ready(v)
        total, heads, dim = q.shape
        batch = cu_q.numel() - 1
        o = torch.empty_like(q)
        lse = torch.empty((heads, total), device=q.device, dtype=torch.float32)
        _launch(
            "fwd", lambda t: (triton.cdiv(max_q, t["BLOCK_M"]) * batch * heads,), max(max_q, max_k),
            q, _descriptor(k), _descriptor(v), o, lse, cu_q, cu_k, max_q, scale * LOG2E,
            q.stride(0), q.stride(1), o.stride(0), o.stride(1), lse.stride(0),
            H=heads, GROUP=heads // k.shape[1], CAUSAL=causal, D=dim, PREC=_precision(q),
        )
        ctx.save_for_backward(q, k, v, o, lse, cu_q, cu_k)
        ctx.meta = (max_q, max_k, causal, scale)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu_q, cu_k = ctx.saved_tensors
        max_q, max_k, causal, scale = ctx.meta
        do = _tma_ready(do)
        total, heads, dim = q.shape
        kv_heads, batch = k.shape[1], cu_q.numel() - 1
        group = heads // kv_heads
        delta = torch.empty_like(lse)
        _bwd_delta_kernel[(triton.cdiv(total, 64), heads)](
            o, do, delta, o.stride(0), o.stride(1), do.stride(0), do.stride(1), delta.stride(0), total, D=dim, BLOCK=64,
        )
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        if uses_hopper_backward(q):
            _ws_backward(q, k, v, do, lse, delta, dq, dk, dv, cu_q, cu_k, max_q, max_k, causal, scale, scale * LOG2E)
            return dq, dk, dv, None, None, None, None, None, None
        _launch(
            "bwd", lambda t: ((triton.cdiv(max_k, t["BLOCK_N1"]) + group * triton.cdiv(max_q, t["BLOCK_M2"]))
                              * batch * kv_heads,), max(max_q, max_k),
            q, k, v, do, _descriptor(q), _descriptor(do), lse, delta, dq, dk, dv,
            cu_q, cu_k, max_q, max_k, scale * LOG2E, scale, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            v.stride(0), v.stride(1), do.stride(0), do.stride(1), lse.stride(0), dq.stride(0), dq.stride(1),
            dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            HK=kv_heads, GROUP=group, CAUSAL=causal, D=dim, PREC=_precision(q),
        )
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

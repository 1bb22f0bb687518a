"""The Triton kernels of flash attention and their launches: forward, backward, tile choice.

Softmax runs in base 2: scores are multiplied by scale * log2(e), and the saved log-sum-exp is in the same
units, so backward recomputes probabilities with one exp2. The log-sum-exp (and backward's row sums of dO * O)
are stored (heads, tokens): a tile of rows reads them as one contiguous run.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _row_offsets(rows, stride):
    """Element offsets of token rows as a column, in int64: tokens x (heads x dim) passes 2**31 past
    524,288 tokens of 32 x 128."""
    return rows.to(tl.int64)[:, None] * stride


@triton.jit
def key_range(pid_m, len_q, len_k, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
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
def query_range(pid_n, len_q, len_k, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
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
    hi, full = key_range(pid_m, len_q, len_k, CAUSAL, BLOCK_M, BLOCK_N)
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
    lo, diag, full = query_range(pid_n, len_q, len_k, CAUSAL, BLOCK_M, BLOCK_N)
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
    hi, full = key_range(pid_m, len_q, len_k, CAUSAL, BLOCK_M, BLOCK_N)
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


def descriptor(x: torch.Tensor) -> TensorDescriptor:
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
    return triton.autotune(configs, key=["D", "CAUSAL", "GROUP"])(JIT_KERNELS[name])


JIT_KERNELS = {"fwd": _fwd_kernel, "bwd": _bwd_kernel}


def _launch(name: str, grid, longest: int, *args, **kwargs) -> None:
    """grid: tile sizes (a dict by name) -> the launch grid; longest: the longest sequence, for the tiles."""
    fixed = "interpret" if INTERPRET else "fp32" if kwargs["PREC"] == "ieee" else None
    _tuned(name, fixed or triton.next_power_of_2(longest))[grid](*args, **kwargs)


def _precision(q: torch.Tensor) -> str:
    # fp32 inputs get true fp32 products; bf16/fp16 use the tensor cores as they are
    return "ieee" if q.dtype == torch.float32 else "tf32"


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
            cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int, causal: bool, scale_log2: float) -> None:
    """Fills o (shaped as q) and lse ((heads, tokens) float32, base 2)."""
    heads, batch = q.shape[1], cu_q.numel() - 1
    _launch(
        "fwd", lambda t: (triton.cdiv(max_q, t["BLOCK_M"]) * batch * heads,), max(max_q, max_k),
        q, descriptor(k), descriptor(v), o, lse, cu_q, cu_k, max_q, scale_log2,
        q.stride(0), q.stride(1), o.stride(0), o.stride(1), lse.stride(0),
        H=heads, GROUP=heads // k.shape[1], CAUSAL=causal, D=q.shape[2], PREC=_precision(q),
    )


def backward_delta(o: torch.Tensor, do: torch.Tensor, delta: torch.Tensor) -> None:
    """Fills delta ((heads, tokens) float32) with the row sums of dO * O."""
    total, heads, dim = o.shape
    _bwd_delta_kernel[(triton.cdiv(total, 64), heads)](
        o, do, delta, o.stride(0), o.stride(1), do.stride(0), do.stride(1), delta.stride(0), total, D=dim, BLOCK=64,
    )


def backward(q, k, v, do, lse, delta, dq, dk, dv, cu_q, cu_k, max_q: int, max_k: int, causal: bool,
             scale: float, scale_log2: float) -> None:
    """Fills dq, dk, dv (shaped as q, k, v). lse and delta: (heads, tokens) float32, base-2 log-sum-exp
    and the row sums of dO * O."""
    kv_heads, batch = k.shape[1], cu_q.numel() - 1
    group = q.shape[1] // kv_heads
    _launch(
        "bwd", lambda t: ((triton.cdiv(max_k, t["BLOCK_N1"]) + group * triton.cdiv(max_q, t["BLOCK_M2"]))
                          * batch * kv_heads,), max(max_q, max_k),
        q, k, v, do, descriptor(q), descriptor(do), lse, delta, dq, dk, dv,
        cu_q, cu_k, max_q, max_k, scale_log2, scale, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), do.stride(0), do.stride(1), lse.stride(0), dq.stride(0), dq.stride(1),
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        HK=kv_heads, GROUP=group, CAUSAL=causal, D=q.shape[2], PREC=_precision(q),
    )

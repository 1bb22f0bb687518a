"""The backward of flash attention on Hopper, warp-specialised in Gluon: the same mathematics as the Triton
backward (`triton_kernels._bwd_kernel`), scheduled by hand, for bf16 of head dim 64 or 128 on compute capability
9.x (the shapes its GPU tests ran). Imported only where it runs.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonTensorDescriptor

from .triton_kernels import descriptor, key_range, query_range

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
        lo, diag, full = query_range(pid_n, len_q, len_k, CAUSAL, STEP, BLOCK)
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
        hi, full = key_range(pid_m, len_q, len_k, CAUSAL, BLOCK, STEP)
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


def _descriptor(x: torch.Tensor, rows: int) -> GluonTensorDescriptor:
    """`triton_kernels.descriptor(x)` for the Gluon kernels: tiles of `rows` rows, in their shared-memory layout."""
    flat = descriptor(x)
    block = [rows, x.shape[-1]]
    return GluonTensorDescriptor(flat.base, flat.shape, flat.strides, block,
                                 gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16))


def backward(q, k, v, do, lse, delta, dq, dk, dv, cu_q, cu_k, max_q: int, max_k: int, causal: bool,
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
        _descriptor(q, step), _descriptor(do, step), _descriptor(k, block), _descriptor(v, block),
        lse, delta, dk, dv, cu_q, cu_k, max_k, scale_log2, scale,
        lse.stride(0), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        STEP=step, BLOCK=block, STAGES=stages, **meta)
    step, block, stages = WS_DQ_TILES
    _ws_dq_kernel[(group * triton.cdiv(max_q, block) * batch * kv_heads,)](
        _descriptor(q, block), _descriptor(do, block), _descriptor(k, step), _descriptor(v, step),
        lse, delta, dq, cu_q, cu_k, max_q, scale_log2, scale, lse.stride(0), dq.stride(0), dq.stride(1),
        STEP=step, BLOCK=block, STAGES=stages, **meta)

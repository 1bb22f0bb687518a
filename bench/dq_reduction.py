"""How long does adding dq shares into float32 take, alone, at the counts a 5-matmul backward makes?

A causal flash-attention backward that computes dq in its dk/dv programs (one per key block of
128) adds a 64 x 128 float32 share into dq for each query step of 64 rows it visits: at 32K
tokens, 32 query / 8 kv heads, dim 128, that is 2.1 M shares, 69 GB. This times only those
additions (no matmuls), by each way Triton has, beside plain stores of the same tiles, so the
reduction can be compared with the time a whole backward may take. Each reduction is checked
(dq's sums) before it is timed.

    python bench/dq_reduction.py --out $OUT/dq_reduction.json
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

H, HK, D, BM, BN = 32, 8, 128, 64, 128
MODES = ["tl.atomic_add (atom.f32)", "descriptor atomic_add (TMA reduce)", "plain store", "descriptor store (TMA)",
         "red.f32 (inline PTX)"]
REDUCING = (0, 1, 4)


@triton.jit
def _shares(DQ, DQD, MODE: tl.constexpr, S: tl.constexpr, H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
            BM: tl.constexpr, BN: tl.constexpr):
    kb = S // BN
    n, hk = kb - 1 - tl.program_id(0) % kb, tl.program_id(0) // kb  # heaviest key blocks first, as ours
    offs_m = tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    val = tl.full([BM, D], 1.0, tl.float32) + (n % 3).to(tl.float32)
    for g in range(GROUP):
        h = hk * GROUP + g
        for start in range(n * BN // BM * BM, S, BM):  # the query steps a causal key block is seen by
            if MODE == 0:
                tl.atomic_add(DQ + (start + offs_m)[:, None] * (H * D) + h * D + offs_d[None, :], val, sem="relaxed")
            elif MODE == 1:
                DQD.atomic_add([start, h * D], val)
            elif MODE == 2:
                tl.store(DQ + (start + offs_m)[:, None] * (H * D) + h * D + offs_d[None, :], val)
            elif MODE == 3:
                DQD.store([start, h * D], val)
            else:  # red: no value returned, one float per instruction
                ptrs = (DQ + (start + offs_m)[:, None] * (H * D) + h * D + offs_d[None, :]).to(tl.int64, bitcast=True)
                tl.inline_asm_elementwise("red.global.add.f32 [$1], $2;\n mov.b32 $0, 0;", "=r,l,f", [ptrs, val],
                                          dtype=tl.int32, is_pure=False, pack=1)


def expected(row: int) -> float:
    """dq[row, 0] after one pass: key blocks n <= row // BN each add 1 + n % 3."""
    return float(sum(1 + n % 3 for n in range(row // BN + 1)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--out", default=os.environ.get("OUT", ".") + "/dq_reduction.json")
    args = p.parse_args()
    s = args.tokens
    dq = torch.zeros(s, H * D, device="cuda", dtype=torch.float32)
    desc = TensorDescriptor(dq, [s, H * D], [H * D, 1], [BM, D])
    shares = sum(s // BM - n * BN // BM for n in range(s // BN)) * H
    nbytes = shares * BM * D * 4
    rows = []
    for mode, name in enumerate(MODES):
        for warps in (4, 8):
            def run():
                _shares[(s // BN * HK,)](dq, desc, mode, s, H, H // HK, D, BM, BN, num_warps=warps)

            dq.zero_()
            run()
            if mode in REDUCING:
                got = [dq[r, 0].item() for r in (0, s // 2, s - 1)]
                if got != [expected(r) for r in (0, s // 2, s - 1)]:
                    raise SystemExit(f"{name}: dq sums {got} are wrong")
            ms = triton.testing.do_bench(run, warmup=5, rep=50)
            rows.append(dict(mode=name, warps=warps, ms=round(ms, 2), gb_per_s=round(nbytes / ms / 1e6)))
    print(f"{shares:,} shares of {BM}x{D} float32, {nbytes / 1e9:.1f} GB, on {torch.cuda.get_device_name()}")
    print("| way | warps | ms | GB/s |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['warps']} | {r['ms']} | {r['gb_per_s']} |")
    with open(args.out, "w") as f:
        json.dump(dict(tokens=s, shares=shares, bytes=nbytes, rows=rows, device=torch.cuda.get_device_name()), f,
                  indent=1)


if __name__ == "__main__":
    main()

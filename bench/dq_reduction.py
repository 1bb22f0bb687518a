"""How fast can dq partials be added into float32, at the counts a 5-matmul causal backward makes?
32K tokens, 32 q heads / 8 kv heads, dim 128; key blocks of 128, query steps of 64 rows.

A backward that computes dq beside dk and dv (one program per key block) adds a 64 x 128 float32
share into dq per query step it visits. This times those additions alone, no matmuls, by each of
Triton's ways (checked against the expected sums first), beside plain stores of the same tiles.

    python bench/dq_reduction.py $OUT/dq_reduction.json
"""
import json, os, sys
import torch, triton, triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

S, H, HK, D, BM, BN = int(os.environ.get("PROBE_S", 32768)), 32, 8, 128, 64, 128
GROUP = H // HK

@triton.jit
def probe(DQ, DQD, MODE: tl.constexpr, S: tl.constexpr, H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
          BM: tl.constexpr, BN: tl.constexpr):
    kb = S // BN
    n, hk = kb - 1 - tl.program_id(0) % kb, tl.program_id(0) // kb  # heaviest first
    offs_m = tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    val = tl.full([BM, D], 1.0, tl.float32) + (n % 3).to(tl.float32)
    for g in range(GROUP):
        h = hk * GROUP + g
        for start in range(n * BN // BM * BM, S, BM):
            if MODE == 0:
                tl.atomic_add(DQ + (start + offs_m)[:, None] * (H * D) + h * D + offs_d[None, :], val, sem="relaxed")
            elif MODE == 1:
                DQD.atomic_add([start, h * D], val)
            elif MODE == 2:
                tl.store(DQ + (start + offs_m)[:, None] * (H * D) + h * D + offs_d[None, :], val)
            elif MODE == 3:
                DQD.store([start, h * D], val)
            else:  # red (no return) by inline PTX, one float per instruction
                ptrs = (DQ + (start + offs_m)[:, None] * (H * D) + h * D + offs_d[None, :]).to(tl.int64, bitcast=True)
                tl.inline_asm_elementwise("red.global.add.f32 [$1], $2;\n mov.b32 $0, 0;", "=r,l,f", [ptrs, val],
                                          dtype=tl.int32, is_pure=False, pack=1)

def main(out):
    dq = torch.zeros(S, H * D, device="cuda", dtype=torch.float32)
    desc = TensorDescriptor(dq, [S, H * D], [H * D, 1], [BM, D])
    pairs = sum(S // BM - n * BN // BM for n in range(S // BN)) * H
    nbytes = pairs * BM * D * 4
    rows = []
    names = ["tl.atomic_add (atom.f32)", "descriptor atomic_add (TMA reduce)", "plain store", "descriptor store (TMA)",
             "red.f32 (inline PTX)"]
    for mode, name in enumerate(names):
        for warps in (4, 8):
            fn = lambda: probe[(S // BN * HK,)](dq, desc, mode, S, H, GROUP, D, BM, BN, num_warps=warps)
            dq.zero_(); fn(); torch.cuda.synchronize()
            if mode not in (2, 3):  # every row of head h gets sum over key blocks n <= row // BN... check totals
                expect = sum(((torch.arange(S // BN, device="cuda") <= (r // BN)).float() * (1 + torch.arange(S // BN, device="cuda") % 3)).sum().item() for r in (0, S // 2, S - 1))
                got = sum(dq[r, 0].item() for r in (0, S // 2, S - 1))
                ok = abs(got - expect) < 1e-3 * expect
            else:
                ok = True
            ms = triton.testing.do_bench(fn, warmup=5, rep=50)
            rows.append(dict(mode=name, warps=warps, ms=round(ms, 2), gb_per_s=round(nbytes / ms / 1e6), ok=ok))
            print(rows[-1], flush=True)
    print(f"pairs {pairs}, bytes {nbytes/1e9:.1f} GB; a 5-matmul backward at 450 TFLOP/s (counted) takes "
          f"{5 * S * S * D * H / 450e12 * 1e3:.1f} ms at this shape")
    json.dump(dict(pairs=pairs, bytes=nbytes, rows=rows, device=torch.cuda.get_device_name()), open(out, "w"), indent=1)

if __name__ == "__main__":
    main(sys.argv[1])

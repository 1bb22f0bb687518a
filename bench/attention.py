"""Attention speed: ours (Triton) beside torch SDPA's backends and FlexAttention, same run, same GPU.

    python bench/attention.py --out results.json

Causal, 32 query heads / 8 kv heads / dim 128, bf16: two packed batches against FlexAttention
with a document mask (documents of mixed length; many short documents), then one sequence of
8K, 32K and 128K tokens. TFLOP/s count the causal half only: forward 2 matmuls, backward 5.
Each case's output is checked against SDPA's (Flex's for the packed cases) before it is timed,
and the error reported; backward gets a random upstream gradient.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from triton.testing import do_bench

from longctx.kernels.flash_attn import flash_attn_func, flash_attn_varlen_func

HEADS, KV_HEADS, DIM = 32, 8, 128
SDPA_BACKENDS = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
                 "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}
flex = torch.compile(flex_attention, dynamic=False)
MAX_ERR = 1e-2  # relative error of a bf16 output against the reference; every backend measured stays below 3e-3


def causal_flops(lengths: list[int]) -> float:
    return sum(4 * n * n * HEADS * DIM / 2 for n in lengths)  # forward: QK^T and PV over the causal half


def timed(fn, grad: torch.Tensor, leaves: tuple[torch.Tensor, ...]) -> tuple[float, float]:
    """(forward ms, forward+backward ms), medians; the inputs' gradients are cleared between calls,
    so no call pays for adding into the last one's."""
    fwd = do_bench(fn, warmup=100, rep=400, return_mode="median")

    def both():
        fn().backward(grad)

    return fwd, do_bench(both, warmup=100, rep=400, grad_to_none=list(leaves), return_mode="median")


def inputs(total: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    make = lambda h: torch.randn(total, h, DIM, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    return make(HEADS), make(KV_HEADS), make(KV_HEADS)


def single_sequence(n: int) -> list[dict]:
    q, k, v = inputs(n, n)
    qb, kb, vb = (x.detach().unsqueeze(0).requires_grad_() for x in (q, k, v))
    qt, kt, vt = (x.detach().transpose(0, 1).unsqueeze(0).contiguous().requires_grad_() for x in (q, k, v))
    # SDPA's fused backends take GQA as repeated k/v; repeating happens outside the timed region
    kr, vr = (x.detach().repeat_interleave(HEADS // KV_HEADS, 1).contiguous().requires_grad_() for x in (kt, vt))
    block = create_block_mask(lambda b, h, qi, ki: qi >= ki, 1, None, n, n, device="cuda", _compile=True)
    cases = {"ours (triton)": (lambda: flash_attn_func(qb, kb, vb, causal=True), (qb, kb, vb))}
    for name, backend in SDPA_BACKENDS.items():
        def run(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qt, kr, vr, is_causal=True)
        cases[name] = (run, (qt, kr, vr))
    cases["flex"] = (lambda: flex(qt, kt, vt, block_mask=block, enable_gqa=True), (qt, kt, vt))
    with torch.no_grad(), sdpa_kernel(list(SDPA_BACKENDS.values())):
        expected = F.scaled_dot_product_attention(qt, kr, vr, is_causal=True).transpose(1, 2).float()
    return measure(cases, expected, causal_flops([n]), f"{n // 1024}K")


def measure(cases: dict, expected: torch.Tensor, flops: float, label: str) -> list[dict]:
    """cases: name -> (function, its input tensors); each is checked against `expected`, then timed."""
    rows = []
    for name, (fn, leaves) in cases.items():
        try:
            out = fn()
            got = out.float() if out.shape == expected.shape else out.transpose(1, 2).float()
            err = ((got - expected).norm() / expected.norm()).item()
            if not err < MAX_ERR:
                raise ValueError(f"output off the reference by {err:.1e} (at most {MAX_ERR:g}): not timed")
            # a random upstream gradient, as training gives (a constant one timed faster on the H100)
            gen = torch.Generator("cuda").manual_seed(1)
            grad = torch.randn(out.shape, device="cuda", dtype=out.dtype, generator=gen)
            fwd, both = timed(fn, grad, leaves)
            rows.append({"case": label, "impl": name, "rel_err_vs_sdpa": err, "fwd_ms": fwd, "fwd_bwd_ms": both,
                         "fwd_tflops": flops / fwd / 1e9, "fwd_bwd_tflops": 3.5 * flops / both / 1e9})
        except Exception as e:  # a backend that cannot run this case is reported, not hidden
            rows.append({"case": label, "impl": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"})
        print_row(rows[-1])
        torch.cuda.empty_cache()
    return rows


def print_row(r: dict) -> None:
    if "error" in r:
        print(f"{r['case']:<26}{r['impl']:<24}  {r['error']}", flush=True)
    else:
        print(f"{r['case']:<26}{r['impl']:<24}{r['fwd_tflops']:>10.0f}{r['fwd_bwd_tflops']:>14.0f}"
              f"{r['rel_err_vs_sdpa']:>10.1e}", flush=True)


def mixed_lengths(total: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    lengths = []
    while sum(lengths) < total:
        lengths.append(min(rng.choice([rng.randint(64, 1024), rng.randint(1024, 8192), rng.randint(8192, 16384)]),
                           total - sum(lengths)))
    return lengths


def equal_lengths(text: str) -> list[int]:
    """COUNTxLENGTH -> COUNT lengths of LENGTH tokens."""
    try:
        count, length = (int(x) for x in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected COUNTxLENGTH such as 256x256, got {text!r}") from None
    if count < 1 or length < 1:
        raise argparse.ArgumentTypeError(f"COUNT and LENGTH must be positive, got {text!r}")
    return [length] * count


def packed_documents(lengths: list[int], seed: int = 0) -> list[dict]:
    total = sum(lengths)
    q, k, v = inputs(total, seed)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device="cuda")
    doc = torch.repeat_interleave(torch.arange(len(lengths), device="cuda"), torch.tensor(lengths, device="cuda"))
    block = create_block_mask(lambda b, h, qi, ki: (doc[qi] == doc[ki]) & (qi >= ki), 1, None, total, total,
                              device="cuda", _compile=True)
    qt, kt, vt = (x.detach().transpose(0, 1).unsqueeze(0).contiguous().requires_grad_() for x in (q, k, v))
    cases = {
        "ours (triton, varlen)": (lambda: flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths))
                                  .unsqueeze(0), (q, k, v)),
        "flex (document mask)": (lambda: flex(qt, kt, vt, block_mask=block, enable_gqa=True), (qt, kt, vt)),
    }
    expected = flex(qt, kt, vt, block_mask=block, enable_gqa=True).transpose(1, 2).float()
    return measure(cases, expected, causal_flops(lengths), f"packed {total // 1024}K ({len(lengths)} docs)")


def warm_up(seconds: float = 3.0) -> None:
    """Busy the GPU before the first case: without this, the first case timed up to 10% slow on the H100."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


def write_rows(path: str | None, rows: list[dict]) -> None:
    """The rows as JSON with the device and torch they ran on (nothing without a path)."""
    if path:
        with open(path, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="8192,32768,131072")
    parser.add_argument("--packed", type=int, default=65536, help="tokens of the packed batch of mixed documents")
    parser.add_argument("--short-docs", default="256x256", type=equal_lengths,
                        help="a packed batch of COUNTxLENGTH equal documents")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}")
    print(f"{'case':<26}{'impl':<24}{'fwd TF/s':>10}{'fwd+bwd TF/s':>14}{'err':>10}")
    warm_up()
    rows = packed_documents(mixed_lengths(args.packed)) + packed_documents(args.short_docs)
    for n in (int(x) for x in args.lengths.split(",")):
        rows += single_sequence(n)
    write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

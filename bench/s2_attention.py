"""S²-Attn against full attention, attention alone: forward + backward through longctx's attention function
(`attention_forward`, the one the model calls), the module in training mode, same run, same GPU.

    python bench/s2_attention.py --out s2_attention.json

Two head shapes (SmolLM2-135M: 9 query / 3 kv heads of 64; Llama-3.1-8B: 32 / 8 of 128), bf16, 64K windows:
one document, and three windows of passkey episodes with lengths drawn as the extension study's training data
draws them (log-uniform from 1/32 of the window to twice it, clipped, the last one taking what is left; seeds
1-3). S²-Attn in groups of a quarter of the window. Before timing, the plain half's outputs over the first
group are checked equal to full attention's (a token there sees the same keys either way).
"""

from __future__ import annotations

import argparse
import math
import random
import sys

import torch
from triton.testing import do_bench

from attention import warm_up, write_rows  # bench/attention.py, beside this script
from longctx.attention import attention_forward

SHAPES = {"smollm2-135m": (9, 3, 64), "llama-3.1-8b": (32, 8, 128)}
MAX_ERR = 1e-2  # relative error between two bf16 outputs of the same attention


def episode_lengths(window: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    low, lengths = window // 32, []
    while sum(lengths) < window:
        left = window - sum(lengths)
        length = min(window, round(math.exp(rng.uniform(math.log(low), math.log(2 * window)))))
        lengths.append(left if length > left - low else length)
    return lengths


class Training(torch.nn.Module):
    """What attention_forward reads of the calling layer: that it trains."""


def measure(shape: str, layout: str, lengths: list[int], group: int, backend: str) -> dict:
    heads, kv_heads, dim = SHAPES[shape]
    n = sum(lengths)
    positions = torch.cat([torch.arange(length) for length in lengths]).view(1, n).cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, h, n, dim, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
               for h in (heads, kv_heads, kv_heads))
    layer = Training().train()

    def attend(s2_group: int):
        return lambda: attention_forward(layer, q, k, v, None, position_ids=positions, backend=backend,
                                         s2_group=s2_group)[0]

    full, s2 = attend(0), attend(group)
    with torch.no_grad():
        a, b = full()[:, :group, :heads // 2].float(), s2()[:, :group, :heads // 2].float()
    err = ((a - b).norm() / a.norm()).item()
    if not err < MAX_ERR:
        raise SystemExit(f"{shape} {layout}: S²-Attn's plain heads over the first group differ from full "
                         f"attention's by {err:.1e} (at most {MAX_ERR:g})")
    grad = torch.randn(1, n, heads, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    row = {"shape": shape, "layout": layout, "documents": len(lengths), "tokens": n, "group": group,
           "backend": backend, "first_group_rel_err": err}
    for name, fn in (("full", full), ("s2", s2)):
        row[f"{name}_ms"] = do_bench(lambda: fn().backward(grad), warmup=50, rep=300, grad_to_none=[q, k, v],
                                     return_mode="median")
    row["speedup"] = row["full_ms"] / row["s2_ms"]
    print(f"{shape:<14}{layout:<22}{len(lengths):>5}{backend:>8}{row['full_ms']:>11.1f}{row['s2_ms']:>11.1f}"
          f"{row['speedup']:>9.2f}x", flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=65536)
    parser.add_argument("--backends", default="auto,triton", help="longctx attention backends to time")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: bench/s2_attention.py times CUDA kernels; this machine has no CUDA device", file=sys.stderr)
        return 2
    layouts = {"one document": [args.window],
               **{f"episodes, seed {seed}": episode_lengths(args.window, seed) for seed in (1, 2, 3)}}
    warm_up()  # the first case would time slow on a cold GPU, and it is always a full-attention one
    print(f"{'shape':<14}{'layout':<22}{'docs':>5}{'backend':>8}{'full ms':>11}{'S² ms':>11}{'speedup':>10}")
    rows = [measure(shape, layout, lengths, args.window // 4, backend) for shape in SHAPES
            for layout, lengths in layouts.items() for backend in args.backends.split(",")]
    write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

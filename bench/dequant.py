"""A frozen base linear in NF4 (QLoRA, as longctx.quantize stores it) beside the same linear in bf16, same run.

    python bench/dequant.py --model llama-3.1-8b --tokens 16384 --out dequant.json

For each linear of one decoder layer of the model's shape: forward (y = x W^T) and the backward a frozen
weight needs (dx = dy W), in bf16 against NF4, where bitsandbytes dequantises W in each pass. First a check, on
the first 4,096 tokens: NF4's output and input gradient equal those of its dequantised weight in float32 (to
bf16 rounding). Times are medians of triton.testing.do_bench.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from longctx.quantize import dequantize, quantize_linears  # noqa: E402

CHECKED_ROWS = 4096


def layer_linears(model: str) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear of one decoder layer, from a shipped config (longctx/assets/<model>)."""
    c = json.loads((ROOT / "longctx" / "assets" / model / "config.json").read_text())
    h, i = c["hidden_size"], c["intermediate_size"]
    d = c.get("head_dim") or h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def pair(fan_in: int, fan_out: int, device: torch.device) -> tuple[torch.nn.Linear, torch.nn.Module]:
    """The same frozen weight as a bf16 linear and as an NF4 one."""
    torch.manual_seed(0)
    plain = torch.nn.Linear(fan_in, fan_out, bias=False, dtype=torch.bfloat16, device=device).requires_grad_(False)
    holder = torch.nn.Module()
    holder.linear = torch.nn.Linear(fan_in, fan_out, bias=False, dtype=torch.bfloat16).requires_grad_(False)
    holder.linear.weight.copy_(plain.weight.cpu())
    quantize_linears(holder, device)
    return plain, holder.linear


def step(linear: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Forward, then the input gradient (the only one a frozen weight has)."""
    y = linear(x)
    (dx,) = torch.autograd.grad(y, x, dy)
    return dx


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3.1-8b", help="a config under longctx/assets")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--out", default=None, help="JSON file for the rows")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for name, (fan_in, fan_out) in layer_linears(args.model).items():
        plain, nf4 = pair(fan_in, fan_out, device)
        x = torch.randn(args.tokens, fan_in, device=device, dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(args.tokens, fan_out, device=device, dtype=torch.bfloat16)
        # checked on the first rows: float32 copies of every row would not fit beside the 70B's MLP at 128K tokens
        rows_checked = min(args.tokens, CHECKED_ROWS)
        weight = dequantize(nf4).float()
        y_ref = x[:rows_checked].detach().float() @ weight.T
        dx_ref = dy[:rows_checked].float() @ weight
        y = nf4(x)
        (dx,) = torch.autograd.grad(y, x, dy)
        error = max(((ours[:rows_checked].float() - ref).norm() / ref.norm()).item()
                    for ours, ref in ((y, y_ref), (dx, dx_ref)))
        del y, dx, y_ref, dx_ref, weight
        if error > 1e-2:
            print(f"error: {name}: NF4's output or input gradient is {error:.1e} away from the dequantised weight's",
                  file=sys.stderr)
            return 1
        row = {"linear": name, "in": fan_in, "out": fan_out, "tokens": args.tokens, "nf4_rel_err": error}
        if device.type == "cuda":
            from triton.testing import do_bench

            row["bf16_ms"] = do_bench(lambda: step(plain, x, dy), warmup=10, rep=50, return_mode="median")
            row["nf4_ms"] = do_bench(lambda: step(nf4, x, dy), warmup=10, rep=50, return_mode="median")
            row["nf4_over_bf16"] = row["nf4_ms"] / row["bf16_ms"]
        rows.append(row)
        print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    if device.type == "cuda":
        bf16, nf4 = sum(r["bf16_ms"] for r in rows), sum(r["nf4_ms"] for r in rows)
        print(f"one layer's linears, forward + input gradient at {args.tokens} tokens: bf16 {bf16:.2f} ms, "
              f"NF4 {nf4:.2f} ms ({nf4 / bf16:.2f}x); {torch.cuda.get_device_name()}")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": args.model, "device": str(device) if device.type == "cpu"
                                              else torch.cuda.get_device_name(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

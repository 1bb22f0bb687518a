"""Fused RoPE beside transformers' rotary path, and against the device's copy bandwidth, same run.

    python bench/rope.py --out rope.json

q (1, 131072, 32, 128) and k (1, 131072, 8, 128) in bf16, forward + backward. transformers'
path is what a Llama layer runs: the rotary module builds cos/sin for the positions, then
apply_rotary_pos_emb rotates q and k. The fused kernel's floor is reading and writing q and
k once per pass; bytes moved / time is compared with a plain device-to-device copy.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import transformers
import triton
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
from triton.testing import do_bench

from longctx.kernels.rope import apply_rope, rope_reference

SEQ, HEADS, KV_HEADS, DIM = 131072, 32, 8, 128


def copy_bandwidth() -> float:
    """Bytes read + written per second by a large device copy."""
    src = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * src.element_size() / ms * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    config = LlamaConfig(hidden_size=HEADS * DIM, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         max_position_embeddings=SEQ, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    rotary = LlamaRotaryEmbedding(config).to("cuda")  # no device argument: 5.18 removed it
    positions = torch.arange(SEQ, device="cuda")[None]
    inv_freq = rotary.inv_freq.float()
    q = torch.randn(1, SEQ, HEADS, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, SEQ, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    qh = q.detach().transpose(1, 2).contiguous().requires_grad_()  # transformers rotates (batch, heads, seq, dim)
    kh = k.detach().transpose(1, 2).contiguous().requires_grad_()

    def ours():
        return apply_rope(q, k, positions, inv_freq)

    def transformers_path():
        cos, sin = rotary(qh, positions)
        return apply_rotary_pos_emb(qh, kh, cos, sin)

    # same function: both against the float32 reference, in the fused kernel's layout
    (oq, ok), (tq, tk) = ours(), transformers_path()
    rq, rk = rope_reference(q.detach().float(), k.detach().float(), positions, inv_freq)

    def rel_err(pair):
        return max(((a.float() - r).norm() / r.norm()).item() for a, r in zip(pair, (rq, rk)))

    err = {"ours": rel_err((oq, ok)), "transformers": rel_err((tq.transpose(1, 2), tk.transpose(1, 2)))}
    del oq, ok, tq, tk, rq, rk

    grads = {id(fn): [torch.ones_like(t) for t in fn()] for fn in (ours, transformers_path)}
    leaves = {id(ours): (q, k), id(transformers_path): (qh, kh)}

    def both(fn):
        def run():  # gradients made once outside the timed region, returned rather than accumulated into .grad
            torch.autograd.grad(fn(), leaves[id(fn)], grads[id(fn)])
        return run

    bandwidth = copy_bandwidth()
    pass_bytes = 2 * (q.numel() + k.numel()) * q.element_size()  # read and write q and k once
    rows = []
    for name, fn in (("ours (fused triton)", ours), ("transformers", transformers_path)):
        fwd = do_bench(fn, warmup=50, rep=300, return_mode="median")
        fb = do_bench(both(fn), warmup=50, rep=300, return_mode="median")
        rows.append({"impl": name, "fwd_ms": fwd, "fwd_bwd_ms": fb,
                     "fwd_bwd_bytes_per_s": 2 * pass_bytes / fb * 1e3,
                     "fraction_of_copy_bandwidth": 2 * pass_bytes / fb * 1e3 / bandwidth})
    print(f"{torch.cuda.get_device_name()}  copy bandwidth {bandwidth / 1e12:.2f} TB/s  rel err vs fp32: "
          f"ours {err['ours']:.1e}, transformers {err['transformers']:.1e}")
    print(f"{'impl':<22}{'fwd ms':>9}{'fwd+bwd ms':>12}{'TB/s':>8}{'of copy':>9}")
    for r in rows:
        print(f"{r['impl']:<22}{r['fwd_ms']:>9.3f}{r['fwd_bwd_ms']:>12.3f}{r['fwd_bwd_bytes_per_s'] / 1e12:>8.2f}"
              f"{r['fraction_of_copy_bandwidth']:>9.0%}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "transformers": transformers.__version__, "triton": triton.__version__,
                       "copy_bytes_per_s": bandwidth, "rel_err_vs_fp32": err, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

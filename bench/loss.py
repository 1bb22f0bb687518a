"""Output projection + cross-entropy without full logits: ours beside DeepSpeed's TiledFusedLogitsLoss.

    python bench/loss.py --out loss.json

Llama-3.1-8B's head (hidden 4096, vocab 128,256), bf16, frozen head weight (LoRA) and a
trained one (full fine-tune), 16K and 128K tokens, chunks of 4096 tokens for both. Forward +
backward time (median of CUDA-event timings after a warm-up) and the peak memory above the
inputs. Before timing, each loss is run under a loss scale of 0.5 (as training scales it) and
compared with plain autograd over the same chunks: the value, the hidden states' gradient and, for
a trained head, the projection's gradient; ours must agree (bf16 tolerance), DeepSpeed's is
reported as it comes.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F

from longctx.loss import chunked_lm_loss

HIDDEN, VOCAB, CHUNK = 4096, 128256, 4096
SCALE = 0.5  # the loss scale of the correctness check: training divides the summed loss by the token count


def ours(head: torch.nn.Linear, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return chunked_lm_loss(hidden, head.weight, labels, CHUNK)


def deepspeed_tiled(head: torch.nn.Linear, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

    def loss_fn(module, x, y):
        return F.cross_entropy(module(x).float().view(-1, VOCAB), y.view(-1), reduction="sum")

    shards = math.ceil(hidden.shape[1] / CHUNK)
    return TiledFusedLogitsLoss.apply(loss_fn, head, hidden, labels, None, shards, [], "sum")


def reference(head: torch.nn.Linear, hidden: torch.Tensor, labels: torch.Tensor, scale: float):
    """Plain autograd, one chunk of logits at a time: (loss, hidden-state gradient, projection gradient or None)."""
    hidden.grad, head.weight.grad = None, None
    total = 0.0
    for start in range(0, hidden.shape[1], CHUNK):
        h = hidden[:, start:start + CHUNK]
        loss = F.cross_entropy(head(h).float().view(-1, VOCAB), labels[:, start:start + CHUNK].reshape(-1),
                               reduction="sum")
        (loss * scale).backward()
        total += loss.item()
    return total, hidden.grad.float().clone(), None if head.weight.grad is None else head.weight.grad.float().clone()


def scaled_run(fn, head: torch.nn.Linear, hidden: torch.Tensor, labels: torch.Tensor, scale: float):
    hidden.grad, head.weight.grad = None, None
    loss = fn(head, hidden, labels)
    (loss * scale).backward()
    return loss.item(), hidden.grad.float().clone(), None if head.weight.grad is None else head.weight.grad.float().clone()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def measure(fn, head, hidden, labels, reps: int = 5) -> tuple[float, float]:
    """(median ms of forward + backward, peak GiB allocated above what existed before)."""
    times = []
    for i in range(reps + 1):
        hidden.grad, head.weight.grad = None, None  # each step makes its gradients afresh, as training does
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(head, hidden, labels).backward()
        end.record()
        torch.cuda.synchronize()
        if i:  # the first is the warm-up
            times.append(start.elapsed_time(end))
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return sorted(times)[len(times) // 2], peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="16384,131072")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    rows = []
    for trained_head in (False, True):
        head = torch.nn.Linear(HIDDEN, VOCAB, bias=False, device="cuda", dtype=torch.bfloat16)
        head.weight.requires_grad_(trained_head)
        for n in map(int, args.lengths.split(",")):
            hidden = torch.randn(1, n, HIDDEN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            labels = torch.randint(0, VOCAB, (1, n), device="cuda")
            labels[0, -1] = -100
            ref_loss, ref_h, ref_w = reference(head, hidden, labels, SCALE)
            for name, fn in (("ours", ours), ("deepspeed TiledFusedLogitsLoss", deepspeed_tiled)):
                loss, grad_h, grad_w = scaled_run(fn, head, hidden, labels, SCALE)
                check = {"loss_rel_diff": abs(loss - ref_loss) / abs(ref_loss), "hidden_grad_rel_diff": rel(grad_h, ref_h),
                         "head_grad_rel_diff": None if ref_w is None else rel(grad_w, ref_w)}
                if fn is ours:
                    assert max(v for v in check.values() if v is not None) < 1e-2, check
                del grad_h, grad_w
                ms, peak = measure(fn, head, hidden, labels)
                row = {"impl": name, "tokens": n, "head_trained": trained_head, "fwd_bwd_ms": round(ms, 1),
                       "peak_gib": round(peak, 2), **check}
                rows.append(row)
                print(json.dumps(row), flush=True)
            del hidden
    print("| head | tokens | implementation | fwd+bwd ms | peak GiB above inputs | head gradient error |")
    print("|---|---:|---|---:|---:|---:|")
    for r in rows:
        head_err = "-" if r["head_grad_rel_diff"] is None else f"{r['head_grad_rel_diff']:.1e}"
        print(f"| {'trained' if r['head_trained'] else 'frozen'} | {r['tokens'] // 1024}K | {r['impl']} | "
              f"{r['fwd_bwd_ms']} | {r['peak_gib']} | {head_err} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

"""Output projection + cross-entropy without full logits: ours beside DeepSpeed's TiledFusedLogitsLoss.

    python bench/loss.py --out loss.json

Llama-3.1-8B's head (hidden 4096, vocab 128,256), bf16, frozen head weight (LoRA) and a
trained one (full fine-tune), 16K and 128K tokens, chunks of 4096 tokens for both. Forward +
backward time (median of CUDA-event timings after a warm-up) and the peak memory above the
inputs. The two losses' difference (value and hidden-state gradient) is measured and reported
beside the times; the projection's gradient under a loss scale is tested in tests/test_loss.py.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F

from longctx.loss import chunked_lm_loss

HIDDEN, VOCAB, CHUNK = 4096, 128256, 4096


def ours(head: torch.nn.Linear, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return chunked_lm_loss(hidden, head.weight, labels, CHUNK)


def deepspeed_tiled(head: torch.nn.Linear, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

    def loss_fn(module, x, y):
        return F.cross_entropy(module(x).float().view(-1, VOCAB), y.view(-1), reduction="sum")

    shards = math.ceil(hidden.shape[1] / CHUNK)
    return TiledFusedLogitsLoss.apply(loss_fn, head, hidden, labels, None, shards, [], "sum")


def measure(fn, head, hidden, labels, reps: int = 5) -> tuple[float, float]:
    """(median ms of forward + backward, peak GiB allocated above what existed before)."""
    times = []
    for i in range(reps + 1):
        hidden.grad = None
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
            checks = []
            for fn in (ours, deepspeed_tiled):
                hidden.grad = None
                loss = fn(head, hidden, labels)
                loss.backward()
                checks.append((loss.detach().float(), hidden.grad.float().clone()))
            (la, ga), (lb, gb) = checks
            err = ((ga - gb).norm() / gb.norm()).item()
            for name, fn in (("ours", ours), ("deepspeed TiledFusedLogitsLoss", deepspeed_tiled)):
                ms, peak = measure(fn, head, hidden, labels)
                row = {"impl": name, "tokens": n, "head_trained": trained_head, "fwd_bwd_ms": round(ms, 1),
                       "peak_gib": round(peak, 2), "loss_rel_diff": abs(la.item() - lb.item()) / abs(lb.item()),
                       "grad_rel_diff": err}
                rows.append(row)
                print(json.dumps(row), flush=True)
            del hidden
    print("| head | tokens | implementation | fwd+bwd ms | peak GiB above inputs |")
    print("|---|---:|---|---:|---:|")
    for r in rows:
        print(f"| {'trained' if r['head_trained'] else 'frozen'} | {r['tokens'] // 1024}K | {r['impl']} | "
              f"{r['fwd_bwd_ms']} | {r['peak_gib']} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

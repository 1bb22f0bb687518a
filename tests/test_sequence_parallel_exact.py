"""Ulysses is exact: with sp = 2 and sp = 4 the loss and the LoRA gradients equal sp = 1.

One `deepspeed` launch of 4 CPU ranks (gloo) runs this file as its script: every rank builds the
same tiny Llama with LoRA and the same packed batch, computes sp = 1 alone, sp = 2 in its pair
of ranks and sp = 4 with all of them, for the attention backends that train on CPU, with GQA
(kv heads = 2 < sp = 4, so repeated) and MQA, with full attention and with S²-Attn (each rank rolls the
shifted heads it holds, on whole sequences). Rank 0 writes the differences; the test reads
them. A control breaks one thing the design depends on (global positions) and must differ.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAD_LAYOUTS = {"gqa": (4, 2), "mqa": (4, 1)}  # (attention heads, key/value heads)
# flex has no backward on CPU; the backends differ below the wrapper, so the other layout needs one
CASES = [("gqa", "sdpa", 0), ("gqa", "eager", 0), ("gqa", "triton", 0), ("mqa", "sdpa", 0), ("gqa", "sdpa", 16),
         ("mqa", "eager", 16)]  # (head layout, attention.backend, S²-Attn group: 0 = full attention)
SEQ_LEN, MICRO_BATCH = 64, 2
TOL = 1e-5


def packed_batch():
    """Two windows of randomly long documents, labels shifted on the whole window."""
    import numpy as np
    import torch

    from longctx.data import pack_documents

    rng = np.random.default_rng(0)
    docs = [{"input_ids": rng.integers(3, 97, n).tolist(), "loss_mask": [1] * n} for n in rng.integers(5, 40, 12)]
    packed = pack_documents(docs, SEQ_LEN)
    assert (packed.position_ids[:MICRO_BATCH] == 0).sum() >= 4, "the windows must hold several documents"
    keys = ("input_ids", "position_ids", "labels")
    return {k: torch.from_numpy(getattr(packed, k)[:MICRO_BATCH]).long() for k in keys}


def lora_model(heads: int, kv_heads: int, backend: str, s2_group: int = 0):
    """A tiny Llama with LoRA everywhere; adapters drawn at random so every one has a gradient."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from longctx.attention import attention_implementation
    from longctx.config import LoraSection
    from longctx.model import add_lora

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, head_dim=16,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256)
    model = LlamaForCausalLM(config).float()
    model.set_attn_implementation(attention_implementation(backend, s2_group=s2_group))
    model = add_lora(model, LoraSection(enabled=True, r=4, train_norms=True))
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    return model


def loss_and_grads(model, batch, group=None) -> tuple[float, dict]:
    """Mean loss over the whole sequence and its LoRA gradients, summed over the sp group (if any)."""
    import torch.distributed as dist

    from longctx.loss import causal_lm_loss

    def sum_over_group(t):
        if group is not None:
            dist.all_reduce(t, group=group)
        return t

    n = sum_over_group((batch["labels"] != -100).sum().float())
    loss_sum, _ = causal_lm_loss(model, **batch, chunk_tokens=16)
    (loss_sum / n).backward()
    loss = sum_over_group(loss_sum.detach() / n)
    grads = {k: sum_over_group(p.grad) for k, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads


def compare(got: tuple[float, dict], reference: tuple[float, dict]) -> dict:
    (loss, grads), (ref_loss, ref_grads) = got, reference
    return {
        "loss": ref_loss,
        "loss_diff": abs(loss - ref_loss),
        "grad_max_diff": max((grads[k] - ref_grads[k]).abs().max().item() for k in ref_grads),
        "grad_max": max(g.abs().max().item() for g in ref_grads.values()),
        "grads": len(ref_grads),
    }


def run_ranks(out: Path) -> None:
    """What every rank of the launch does."""
    import torch.distributed as dist

    from longctx.topology import init_topology
    from longctx.sequence_parallel import shard_batch, use_ulysses

    init_topology(1)  # the process group only: the test builds its own sp groups below
    rank = dist.get_rank()
    assert dist.get_world_size() == 4
    # every rank creates every group, in the same order
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    groups = {2: pairs[rank // 2], 4: dist.new_group([0, 1, 2, 3])}
    batch = packed_batch()
    results = {}
    references = {}
    for layout, backend, s2_group in CASES:
        heads, kv_heads = HEAD_LAYOUTS[layout]
        references[layout, backend, s2_group] = loss_and_grads(lora_model(heads, kv_heads, backend, s2_group), batch)
        for sp, group in groups.items():
            model = lora_model(heads, kv_heads, backend, s2_group)
            use_ulysses(model, group, MICRO_BATCH)
            results[f"{layout}-{backend}-s2g{s2_group}-sp{sp}"] = compare(
                loss_and_grads(model, shard_batch(batch, dist.get_rank(group), sp), group),
                references[layout, backend, s2_group])
    # control: positions restarted on every shard (local, not global) must change loss and gradients
    model = lora_model(4, 2, "sdpa")
    use_ulysses(model, groups[2], MICRO_BATCH)
    shard = shard_batch(batch, dist.get_rank(groups[2]), 2)
    shard["position_ids"] = shard["position_ids"] - shard["position_ids"][:, :1]
    results["control-local-positions-sp2"] = compare(loss_and_grads(model, shard, groups[2]),
                                                     references["gqa", "sdpa", 0])
    if rank == 0:
        out.write_text(json.dumps(results, indent=1))
    dist.barrier()


@pytest.mark.slow
def test_sp2_and_sp4_loss_and_lora_grads_equal_sp1(tmp_path):
    out = tmp_path / "results.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1",
           "PYTHONPATH": str(ROOT), "SP_EXACT_OUT": str(out)}
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    proc = subprocess.run([deepspeed, "--num_gpus", "4", "--master_port", str(_port()), __file__],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    cases = [f"{layout}-{backend}-s2g{s2_group}-sp{sp}" for layout, backend, s2_group in CASES for sp in (2, 4)]
    assert sorted(k for k in results if not k.startswith("control")) == sorted(cases)
    for case in cases:
        r = results[case]
        assert r["grads"] >= 20 and r["grad_max"] > 1e-3, (case, r)  # every adapter has a real gradient
        # fp32: the loss within 1e-5, every gradient within 1e-5 of the largest gradient
        assert r["loss_diff"] <= TOL and r["grad_max_diff"] <= TOL * r["grad_max"], (case, r)
    control = results["control-local-positions-sp2"]
    assert control["loss_diff"] > 10 * TOL and control["grad_max_diff"] > 100 * TOL * control["grad_max"], control


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.argv = sys.argv[:1]  # the launcher appends --local_rank
    run_ranks(Path(os.environ["SP_EXACT_OUT"]))

"""Sequence parallelism on 1, 2 and 4 GPUs: the longest sequence that trains and the speed, ours
beside DeepSpeed's Ulysses for Hugging Face models with its tiled MLP and tiled loss (ALST, what a
user would pick instead), same model, same lengths, same run of this script.

    python bench/multi_gpu.py --gpus 4 --out bench-4gpu.jsonl            # on 4 GPUs: sp = 4
    python bench/multi_gpu.py --gpus 1 --out bench-1gpu.jsonl            # the same on 1 GPU
    python bench/multi_gpu.py --gpus 2 --lengths 131072 --no-search      # speed at fixed lengths only

Model: the Llama-3.1-8B architecture with random bf16 weights (speed and memory do not depend on
the values), LoRA r=16 on every linear layer, one sequence per step split over every GPU
(sp = GPUs, dp = 1), activation checkpointing on every decoder layer on both sides. Each
(implementation, length) attempt is a fresh `deepspeed` launch, so running out of memory ends
that attempt only; the longest length is found by doubling, then bisecting to --granule.

    longctx     our stack: longctx.model.load_model (our attention backend, `attention.backend`
                = auto), sequence_parallel.use_ulysses + shard_batch, our chunked loss, the
                engine set up as longctx.train sets it up
    deepspeed   DeepSpeed ALST: UlyssesSPAttentionHF.register_with_transformers around
                transformers' sdpa (flash_attention_2 when installed), UlyssesSPDataLoaderAdapter,
                TiledMLP patched into LlamaMLP as its docstring shows, TiledFusedLogitsLoss

Model TFLOP/s per GPU count the same work for both: 6·N·T for the matmuls (N = parameters
outside the embedding, T = tokens of the step) plus 6·L·T²·D for causal attention (half the
square, L layers, D = heads x head dim), over the step time and the GPUs; recomputation is not
counted. Results: one JSON line per attempt in --out, and markdown tables. Both sides start
from the same seeded weights and data, and each JSON line records rank 0's `loss_sum` of the
last timed step, so the two can be compared by hand; the tables do not compare them.
BENCHMARKS.md has its runs on 1 and 2 GPUs; none on 4 GPUs yet (no such machine has been lent).

A CPU smoke run of the same code paths (gloo, the tiny demo model):
    DS_ACCELERATOR=cpu python bench/multi_gpu.py --gpus 2 --model-config longctx/assets/demo-llama \
        --lengths 256 --no-search --steps 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "hidden_act": "silu",
    "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "bos_token_id": 128000,
    "eos_token_id": 128001,
    "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
}
IMPLS = ("longctx", "deepspeed")
LORA_R = 16
LOSS_CHUNK = 8192


# ---------------------------------------------------------------- worker (one deepspeed launch)

def model_flops(config, tokens: int) -> float:
    """Matmul and causal-attention FLOPs of one forward + backward, as the module docstring defines."""
    text = config.get_text_config()
    heads, kv_heads, hidden = text.num_attention_heads, text.num_key_value_heads, text.hidden_size
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    per_layer = hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * text.intermediate_size
    n = text.num_hidden_layers * per_layer + hidden * text.vocab_size  # and the output projection
    # forward: QK^T and PV, 2·T²·(heads·head_dim) each, halved by causality; backward twice that
    attention = 6 * text.num_hidden_layers * tokens**2 * heads * head_dim
    return 6 * n * tokens + attention


def random_sequence(vocab: int, seq_len: int, device):
    """One document of seq_len random tokens, the same on every rank (as every rank of an sp group reads it)."""
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (1, seq_len), generator=g)
    return ids.to(device), torch.arange(seq_len).unsqueeze(0).to(device)


def longctx_step(args, topo):
    """Our stack, set up as longctx.train sets it up; returns a function that trains one step."""
    import deepspeed
    import torch

    from longctx.config import load_recipe
    from longctx.launcher.dsconfig import build_ds_config
    from longctx.model import load_model
    from longctx.sequence_parallel import shard_batch, use_ulysses
    from longctx.train import CausalLMWithLoss

    recipe = load_recipe(None, [
        f"model.config={args.model_config}", f"data.seq_len={args.seq_len}", f"parallel.sp={topo.sp_size}",
        "lora.enabled=true", f"lora.r={LORA_R}", "rope.method=none", "train.checkpointing=full",
        f"attention.backend={args.attention}", f"train.loss_chunk_tokens={LOSS_CHUNK}",
    ])
    with torch.device(topo.device):  # random weights made on the GPU, not on the host
        model, _ = load_model(recipe, topo.device)
    if topo.sp_size > 1:
        use_ulysses(model, topo.sp_group, 1)
    bf16 = next(model.parameters()).dtype == torch.bfloat16
    engine, *_ = deepspeed.initialize(model=CausalLMWithLoss(model, LOSS_CHUNK),
                                      model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=build_ds_config(recipe, bf16=bf16), mpu=topo.mpu())
    ids, positions = random_sequence(model.config.vocab_size, args.seq_len, topo.device)
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    batch = shard_batch({"input_ids": ids, "position_ids": positions, "labels": labels}, topo.sp_rank, topo.sp_size)
    n_total = args.seq_len - 1

    def step() -> float:
        loss_sum, _ = engine(**batch)
        engine.backward(loss_sum / n_total)  # dp = 1: DeepSpeed sums the sp ranks' gradients
        engine.step()
        return loss_sum.detach()

    return step, model.config


def tiled_mlp_forward(self, x):
    """DeepSpeed's TiledMLP as its docstring patches it into LlamaMLP: tiles of about hidden_size tokens."""
    import deepspeed.comm as dist
    import torch
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    shards = torch.tensor(math.ceil(x.shape[1] / x.shape[2]), device=x.device)
    dist.all_reduce(shards, op=dist.ReduceOp.MAX)  # every rank the same number of tiles

    def mlp(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    # the docstring passes the projection weights; under LoRA the adapters are what train, and
    # ZeRO must hold their gradients until the last tile or it reduces them once per tile
    trainable = [p for p in self.parameters() if p.requires_grad]
    return TiledMLP.apply(mlp, self, x, int(shards.item()), trainable)


def alst_step(args, topo):
    """DeepSpeed's ALST path for a Hugging Face model; returns a function that trains one step.

    `topo` holds only the world: DeepSpeed builds its sp groups itself, in register_with_transformers.
    """
    import deepspeed
    import torch
    import torch.nn.functional as F
    from deepspeed.runtime.sequence_parallel.ulysses_sp import (TiledFusedLogitsLoss, UlyssesSPAttentionHF,
                                                                UlyssesSPDataLoaderAdapter)
    from torch.utils.data import DataLoader
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.llama import modeling_llama
    from transformers.utils import is_flash_attn_2_available

    from longctx.config import LoraSection, load_recipe
    from longctx.launcher.dsconfig import build_ds_config
    from longctx.model import add_lora

    sp = topo.world_size
    core = "flash_attention_2" if topo.device.type == "cuda" and is_flash_attn_2_available() else "sdpa"
    modeling_llama.LlamaMLP.forward = tiled_mlp_forward  # DeepSpeed's documented way, in this process only
    config = AutoConfig.from_pretrained(args.model_config)
    dtype = torch.bfloat16 if topo.device.type == "cuda" else torch.float32
    recipe = load_recipe(None, [f"model.config={args.model_config}", f"data.seq_len={args.seq_len}",
                                f"parallel.sp={sp}"])
    torch.manual_seed(recipe.train.seed)  # as longctx.model seeds it: both sides start from the same weights
    with torch.device(topo.device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=core)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = add_lora(model, LoraSection(enabled=True, r=LORA_R))  # the same adapters as ours
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model, core_attn_implementation=core, sequence_parallel_size=sp,
        micro_batch_size=1, seq_length=args.seq_len, seq_length_is_variable=False)

    class TiledLossLM(torch.nn.Module):
        """ALST's loss: logits and cross-entropy per tile of the shard, never the whole logits."""

        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, position_ids, shift_labels):
            base = self.lm.get_base_model()
            hidden = base.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state

            def loss_fn(head, x, y):
                return F.cross_entropy(head.lm_head(x).float().view(-1, head.config.vocab_size), y.view(-1),
                                       ignore_index=-100, reduction="sum")

            shards = max(1, math.ceil(hidden.shape[1] / LOSS_CHUNK))
            return TiledFusedLogitsLoss.apply(loss_fn, base, hidden, shift_labels, None, shards,
                                              list(base.lm_head.parameters()), "sum")

    engine, *_ = deepspeed.initialize(model=TiledLossLM(model),
                                      model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=build_ds_config(recipe, bf16=dtype == torch.bfloat16), mpu=mpu)
    ids, positions = random_sequence(config.vocab_size, args.seq_len, "cpu")
    sample = {"input_ids": ids[0], "position_ids": positions[0], "labels": ids[0]}  # the adapter shifts
    loader = DataLoader([sample] * 64, batch_size=1)
    if sp > 1:
        loader = UlyssesSPDataLoaderAdapter(loader, sp_rank=mpu.get_sequence_parallel_rank(),
                                            sp_group=mpu.get_sequence_parallel_group(), sp_world_size=sp,
                                            device=topo.device)
    batches = iter(loader)
    n_total = args.seq_len - 1

    def step() -> float:
        batch = next(batches)
        if "shift_labels" not in batch:  # sp = 1: no adapter, shift here as it would
            batch["shift_labels"] = F.pad(batch.pop("labels"), (0, 1), value=-100)[:, 1:]
        batch = {k: batch[k].to(topo.device) for k in ("input_ids", "position_ids", "shift_labels")}
        loss_sum = engine(**batch)
        engine.backward(loss_sum / n_total)
        engine.step()
        return loss_sum.detach()

    return step, config


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from longctx.topology import init_topology
    from longctx.train import peak_memory_gib

    sp = int(os.environ["WORLD_SIZE"])  # every GPU shares the one sequence: dp = 1
    if args.impl == "longctx":
        topo = init_topology(sp)
        step, config = longctx_step(args, topo)
    else:
        topo = init_topology(1)
        step, config = alst_step(args, topo)
    sync = torch.cuda.synchronize if topo.device.type == "cuda" else (lambda: None)
    step()  # the first step also allocates optimizer state: not timed
    sync()
    began = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    step_s = (time.perf_counter() - began) / args.steps
    peak = torch.tensor([peak_memory_gib(topo.device)], device=topo.device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    gpus = topo.world_size
    if topo.rank == 0:
        row = {
            "impl": args.impl, "gpus": gpus, "sp": sp, "seq_len": args.seq_len, "ok": True,
            "step_s": step_s, "tokens_per_s_per_gpu": args.seq_len / step_s / gpus,
            "model_tflops_per_gpu": model_flops(config, args.seq_len) / step_s / gpus / 1e12,
            "peak_mem_gib": round(peak.item(), 2), "loss_sum": float(loss),
            "device": torch.cuda.get_device_name() if topo.device.type == "cuda" else "cpu",
        }
        Path(args.result).write_text(json.dumps(row))


# ---------------------------------------------------------------- driver

def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def attempt(args, impl: str, seq_len: int, workdir: Path) -> dict:
    """One deepspeed launch at one length; a failure is a row with its reason, never an exception."""
    result, log = workdir / f"{impl}-{seq_len}.json", workdir / f"{impl}-{seq_len}.log"
    # the launcher as a module: its script need not sit beside this interpreter (wheels installed with --target)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.gpus), "--master_port", _port(),
           __file__, "--worker", "--impl", impl, "--seq-len", str(seq_len), "--steps", str(args.steps),
           "--model-config", args.model_config, "--attention", args.attention, "--result", str(result)]
    path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "PYTHONPATH": path}
    began = time.perf_counter()
    with log.open("w") as f:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                timeout=args.timeout, start_new_session=True).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    if rc == 0 and result.exists():
        row = json.loads(result.read_text())
    else:
        text = log.read_text(errors="replace")
        reason = "out of memory" if "OutOfMemoryError" in text or "out of memory" in text else f"failed ({rc})"
        row = {"impl": impl, "gpus": args.gpus, "sp": args.gpus, "seq_len": seq_len, "ok": False,
               "reason": reason, "log": str(log)}
    row["launch_s"] = round(time.perf_counter() - began, 1)
    print(json.dumps(row), flush=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def longest(args, impl: str, workdir: Path) -> dict | None:
    """Double from --start while a step trains, then bisect to --granule; the longest row that trained."""
    best, failed, seq_len = None, None, args.start
    while seq_len <= args.max_len:
        row = attempt(args, impl, seq_len, workdir)
        if not row["ok"]:
            failed = seq_len
            break
        best, seq_len = row, seq_len * 2
    granule = args.granule * args.gpus // math.gcd(args.granule, args.gpus)
    while best is not None and failed is not None and failed - best["seq_len"] > granule:
        middle = (best["seq_len"] + failed) // 2 // granule * granule
        row = attempt(args, impl, middle, workdir)
        best, failed = (row, failed) if row["ok"] else (best, middle)
    return best


def tables(rows: list[dict], longest_rows: dict[str, dict | None], gpus: int) -> str:
    """Markdown for BENCHMARKS.md: speed at the fixed lengths, then the longest sequence per implementation."""
    lines = ["| impl | GPUs | sp | tokens | step s | tokens/s/GPU | model TFLOP/s/GPU | peak GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['impl']} | {r['gpus']} | {r['sp']} | {r['seq_len']:,} |"
        if r["ok"]:
            lines.append(f"{head} {r['step_s']:.2f} | {r['tokens_per_s_per_gpu']:,.0f} | "
                         f"{r['model_tflops_per_gpu']:.1f} | {r['peak_mem_gib']} |")
        else:
            lines.append(f"{head} {r['reason']} | | | |")
    if longest_rows:
        lines += ["", "| impl | GPUs | sp | longest sequence that trains | peak GiB |", "|---|---|---|---|---|"]
        for impl, r in longest_rows.items():
            found = "shorter than --start | " if r is None else f"{r['seq_len']:,} | {r['peak_mem_gib']}"
            lines.append(f"| {impl} | {gpus} | {gpus} | {found} |")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, default=1, help="GPUs of this host to use; sp = gpus")
    p.add_argument("--impl", default=",".join(IMPLS), help="longctx, deepspeed or both (comma separated)")
    p.add_argument("--lengths", default="131072,262144", help="tokens per sequence to time (comma separated)")
    p.add_argument("--no-search", action="store_true", help="skip the search for the longest sequence")
    p.add_argument("--start", type=int, default=65536, help="first length of the search")
    p.add_argument("--max-len", type=int, default=4 * 2**20, help="longest length the search tries")
    p.add_argument("--granule", type=int, default=16384, help="the search stops when it knows the length to this")
    p.add_argument("--steps", type=int, default=2, help="timed steps after one untimed step")
    p.add_argument("--timeout", type=int, default=3600, help="seconds one attempt may take")
    p.add_argument("--attention", default="auto", help="our attention.backend")
    p.add_argument("--model-config", default=None, help="a config.json dir (default: Llama-3.1-8B's architecture)")
    p.add_argument("--out", default="bench-multi-gpu.jsonl", help="one JSON line per attempt is appended here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # set by deepspeed
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        return worker(args)
    workdir = Path(tempfile.mkdtemp(prefix="bench-multi-gpu-"))
    if args.model_config is None:
        (workdir / "llama-3.1-8b").mkdir()
        (workdir / "llama-3.1-8b" / "config.json").write_text(json.dumps(LLAMA31_8B))
        args.model_config = str(workdir / "llama-3.1-8b")
    args.model_config = str(Path(args.model_config).resolve())
    impls = [i for i in args.impl.split(",") if i]
    unknown = set(impls) - set(IMPLS)
    if unknown:
        raise SystemExit(f"--impl: {sorted(unknown)} unknown; allowed: {', '.join(IMPLS)}")
    lengths = [int(x) for x in args.lengths.split(",") if x]
    if any(n % args.gpus for n in lengths):
        raise SystemExit(f"--lengths: every length must divide by --gpus={args.gpus} (sp)")
    rows = [attempt(args, impl, n, workdir) for n in lengths for impl in impls]
    found = {} if args.no_search else {impl: longest(args, impl, workdir) for impl in impls}
    print(f"\nlogs in {workdir}\n")
    print(tables(rows, found, args.gpus))


if __name__ == "__main__":
    main()

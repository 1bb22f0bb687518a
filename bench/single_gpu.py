"""One GPU, long sequences: Llama-3.1-8B architecture, LoRA r=16 on all linears, bf16, one training step.

Stacks, side by side (each (stack, length) in its own process, so an out-of-memory does not
poison the next):

    hf       plain Hugging Face: SDPA (torch's default choice), gradient checkpointing, the model's loss
    ds       DeepSpeed components: SDPA with cuDNN first, DeepSpeed TiledMLP and TiledFusedLogitsLoss,
             Hugging Face checkpointing
    ds-cpu   ds + torch.autograd.graph.save_on_cpu(pin_memory=True)
    longctx  ours, as the recipe llama3-8b-lora-1gpu sets it up: the checkpointing layout the planner
             picks (layers not checkpointed, inputs on the GPU or in pinned host memory:
             longctx.activation_checkpointing), chunked loss (longctx.loss), tiled MLP from 32K
             (longctx.tiled_mlp), fused RoPE and RMSNorm (kernels/), our auto attention (SDPA with
             cuDNN first for one document per row)
    qlora    longctx with the decoder layers' linears frozen in 4-bit NF4 (model.quantize=nf4, bitsandbytes),
             built a layer at a time on the GPU
    hf-qlora plain Hugging Face QLoRA, as its documentation writes it: from_pretrained with a BitsAndBytesConfig
             (NF4, double-quantised scales, bf16 compute), prepare_model_for_kbit_training (gradient
             checkpointing), SDPA, the model's loss. Its random weights are saved once as a checkpoint to load
             (HF_QLORA_WEIGHTS, default /tmp/longctx-bench-llama-3.1-8b: 16 GB)

Weights are random, built directly on the GPU in bf16 (hf-qlora saves them from there once and loads them back);
adapters are bf16 in every stack.
A step is forward + backward + AdamW on the adapters. Model TFLOP/s counts 3x the forward
FLOPs (linear layers, lm_head and causal attention), recompute not counted, for every stack.

    python bench/single_gpu.py --runs longctx:16k,hf:16k,ds:16k,longctx:256k --out $OUT/single_gpu.json

--set KEY=VALUE passes a recipe override to the longctx stack, e.g. to force a layout:
    python bench/single_gpu.py --runs longctx:256k --set train.checkpointing=offload --set train.gpu_checkpoint_layers=2

--gpu-mem GIB caps every stack at that much GPU memory, or the whole GPU where it has less
(torch.cuda.set_per_process_memory_fraction), so a larger GPU runs as a smaller one would: the planner plans
for the cap, and a step that needs more runs out of memory. An H100 80GB has 79.18 GiB:
    python bench/single_gpu.py --runs longctx:16k,hf:16k --gpu-mem 79.18

"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "longctx" / "assets" / "llama-3.1-8b"
RECIPE = ROOT / "recipes" / "llama3-8b-lora-1gpu.yaml"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STACKS = ("hf", "ds", "ds-cpu", "longctx", "qlora", "hf-qlora")
HF_STACKS = ("hf", "hf-qlora")  # the model's own loss, Hugging Face gradient checkpointing
OURS = ("longctx", "qlora")
TILE_TOKENS = 4096  # DeepSpeed's recommendation for TiledMLP shards (one hidden size) and our loss chunk
WARMUP_TOKENS = 1024
GiB = 2**30


def parse_tokens(text: str) -> int:
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def parse_runs(text: str) -> list[tuple[str, int]]:
    """STACK:LENGTH,... -> [(stack, tokens)]; refused whole, before anything runs."""
    runs = []
    for item in text.split(","):
        stack, _, length = item.partition(":")
        if stack not in STACKS:
            raise argparse.ArgumentTypeError(f"unknown stack {stack!r} in {item!r} (one of {', '.join(STACKS)})")
        try:
            tokens = parse_tokens(length)
        except ValueError:
            tokens = 0
        if tokens < 1:
            raise argparse.ArgumentTypeError(f"{item!r}: expected STACK:LENGTH, a length of 1 token or more, "
                                             "such as longctx:16k")
        runs.append((stack, tokens))
    return runs


class HostMemoryWatch:
    """Lowest MemAvailable seen (sampled), so pinned and pageable host memory both count."""

    def __init__(self) -> None:
        self.start = self._available()
        self.lowest = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _available() -> int:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.lowest = min(self.lowest, self._available())

    def used_gib(self) -> float:
        self._stop.set()
        return (self.start - min(self.lowest, self._available())) / GiB


def model_flops(config, tokens: int) -> float:
    """3 x forward FLOPs of one sequence of `tokens` (causal attention counts half the scores)."""
    h, L = config.hidden_size, config.num_hidden_layers
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    linear = L * (h * (q + 2 * kv) + q * h + 3 * h * config.intermediate_size) + config.vocab_size * h
    attention = L * 2 * 2 * q * tokens / 2  # QK^T and PV, 2 FLOPs per MAC, half the keys on average
    return 3 * tokens * (2 * linear + attention)


def hf_qlora_model(config):
    """The 8B in 4 bits the way a Hugging Face user loads it: random bf16 weights saved once as a checkpoint, then
    from_pretrained with bitsandbytes' NF4 and peft's k-bit preparation."""
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    weights = Path(os.environ.get("HF_QLORA_WEIGHTS", "/tmp/longctx-bench-llama-3.1-8b"))
    if not (weights / "config.json").is_file():  # built on the GPU, as the other stacks' weights are
        with torch.device("cuda"):
            AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(weights)
        torch.cuda.empty_cache()
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(weights, quantization_config=nf4, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa", device_map={"": 0})
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                           gradient_checkpointing_kwargs={"use_reentrant": False})


def build(stack: str, seq_len: int, overrides: list[str], layout=None):
    """The LoRA model of one stack, its optimizer, and what was patched (for the record). `layout`: our stacks'
    checkpointing layout (None: the planner's for this GPU)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(CONFIG_DIR)
    torch.manual_seed(0)
    if stack == "qlora":
        from longctx.quantize import build_nf4_model

        model = build_nf4_model(config, torch.bfloat16, torch.device("cuda"), None)
        overrides = ["model.quantize=nf4", *overrides]
    elif stack == "hf-qlora":
        model = hf_qlora_model(config)
    else:
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    record = {"warmup_tokens": WARMUP_TOKENS}
    if stack in OURS:
        from longctx.config import load_recipe
        from longctx.launcher.fit import from_recipe
        from longctx.launcher.memory_model import Cluster, estimate
        from longctx.model import patch_model

        # what `launcher/run.py --config recipes/llama3-8b-lora-1gpu.yaml data.seq_len=N` does to the model
        # before LoRA: our attention, fused RoPE and RMSNorm, the checkpointing layout the planner picks for this
        # GPU (its --gpu-mem share), tiled MLP
        recipe = load_recipe(str(RECIPE), [f"data.seq_len={seq_len}", *overrides])
        record["overrides"] = overrides  # with the layout in `changes`, what the planner's tests need of a run
        if layout is None:
            gpu_mem = int(torch.cuda.get_device_properties(0).total_memory
                          * torch.cuda.get_per_process_memory_fraction(0))
            layout = estimate(*from_recipe(recipe), Cluster(gpus_per_node=1, gpu_mem=gpu_mem), seq_len).layout
        t0 = time.perf_counter()
        record["changes"] = patch_model(model, recipe, torch.device("cuda"), layout).changes
        record["patch_s"] = round(time.perf_counter() - t0, 1)
        if recipe.attention.train_pattern == "s2":  # its groups are cut from the recipe's length: warm up at it
            record["warmup_tokens"] = seq_len
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS),
                           autocast_adapter_dtype=False)
    if stack in OURS:
        model.get_base_model().disable_input_require_grads()  # as longctx.model.add_lora does
    model.train()
    if stack in ("hf", "ds", "ds-cpu"):  # hf-qlora: prepare_model_for_kbit_training did
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if stack in ("ds", "ds-cpu"):
        from longctx.tiled_mlp import apply_tiled_mlp

        apply_tiled_mlp(model, TILE_TOKENS)
        record["tiled_mlp"] = TILE_TOKENS
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-5, fused=True), config, record


def train_step(stack: str, model, optimizer, ids) -> float:
    import contextlib

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    labels = torch.roll(ids, -1, dims=1)  # pre-shifted: position t predicts token t+1
    labels[:, -1] = -100
    positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
    attention = contextlib.nullcontext() if stack in (*HF_STACKS, *OURS) else sdpa_kernel(
        [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION], set_priority=True)
    offload = torch.autograd.graph.save_on_cpu(pin_memory=True) if stack == "ds-cpu" else contextlib.nullcontext()
    with attention, offload:
        if stack in HF_STACKS:
            loss = model(input_ids=ids, position_ids=positions, labels=ids).loss
        elif stack in OURS:
            from longctx.loss import causal_lm_loss

            loss_sum, n = causal_lm_loss(model, ids, positions, labels, TILE_TOKENS)
            loss = loss_sum / n
        else:
            from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

            lm = model.get_base_model()
            hidden = lm.model(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state

            def loss_fn(head, x, y):
                return F.cross_entropy(head(x).float().view(-1, head.out_features), y.view(-1), reduction="sum")

            shards = math.ceil(ids.shape[1] / TILE_TOKENS)
            loss = TiledFusedLogitsLoss.apply(loss_fn, lm.lm_head, hidden, labels, None, shards, [], "sum")
            loss = loss / (labels != -100).sum()
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def child(stack: str, seq_len: int, steps: int, overrides: list[str], gpu_mem_gib: float | None) -> dict:
    import torch

    watch = HostMemoryWatch()
    row = {"stack": stack, "seq_len": seq_len, "device": torch.cuda.get_device_name()}
    if gpu_mem_gib is not None:  # at most the whole GPU: 79.18 is an H100's 79.179 GiB rounded up
        total = torch.cuda.get_device_properties(0).total_memory
        cap = min(gpu_mem_gib * GiB, total)
        torch.cuda.set_per_process_memory_fraction(cap / total)
        row["gpu_mem_cap_gib"] = round(cap / GiB, 2)
    try:
        t0 = time.perf_counter()
        model, optimizer, config, record = build(stack, seq_len, overrides)
        row.update(record, build_s=round(time.perf_counter() - t0, 1))
        gen = torch.Generator(device="cuda").manual_seed(seq_len)
        warm = torch.randint(0, config.vocab_size, (1, record["warmup_tokens"]), device="cuda", generator=gen)
        train_step(stack, model, optimizer, warm)  # kernels, handles and workspaces made outside the timing
        ids = torch.randint(0, config.vocab_size, (1, seq_len), device="cuda", generator=gen)
        torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            torch.cuda.synchronize()
            t = time.perf_counter()
            loss = train_step(stack, model, optimizer, ids)
            torch.cuda.synchronize()
            step_s = time.perf_counter() - t
        row.update(status="ok", loss=round(loss, 4), step_s=round(step_s, 2), tokens_per_s=round(seq_len / step_s),
                   model_tflops=round(model_flops(config, seq_len) / step_s / 1e12, 1))
    except torch.OutOfMemoryError as e:
        row.update(status="oom", error=str(e).splitlines()[0][:160])
    except Exception as e:  # reported in the table, not hidden: the run is a data point
        row.update(status="error", error=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    row.update(peak_gpu_gib=round(torch.cuda.max_memory_allocated() / GiB, 1),
               peak_gpu_reserved_gib=round(torch.cuda.max_memory_reserved() / GiB, 1),
               host_used_gib=round(watch.used_gib(), 1),
               host_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 1))
    return row


def table(rows: list[dict]) -> str:
    head = "| stack | tokens | status | step s | tokens/s | model TFLOP/s | peak GPU GiB | host GiB | notes |"
    lines = [head, "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        notes = "; ".join([f"tiled_mlp={r['tiled_mlp']}"] if "tiled_mlp" in r else r.get("changes", []))
        if r["status"] != "ok":
            notes = (notes + "; " if notes else "") + r.get("error", "")[:90]
        lines.append(f"| {r['stack']} | {r['seq_len'] // 1024}K | {r['status']} | {r.get('step_s', '')} | "
                     f"{r.get('tokens_per_s', '')} | {r.get('model_tflops', '')} | {r.get('peak_gpu_gib', '')} | "
                     f"{r.get('host_used_gib', '')} | {notes} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=parse_runs,
                   default="longctx:16k,hf:16k,ds:16k,hf:32k,longctx:64k,longctx:128k,longctx:256k",
                   help="stack:length pairs, run in this order; a stack stops at its first out-of-memory")
    p.add_argument("--steps", type=int, default=0, help="timed steps per run (last reported); 0: 2 up to 32K, else 1")
    p.add_argument("--deadline", type=float, default=560, help="seconds: no run starts after this, a running one is stopped")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipe override for the longctx stack, e.g. train.gpu_checkpoint_layers=2 (repeatable)")
    p.add_argument("--gpu-mem", type=float, default=None, metavar="GIB",
                   help="GPU memory every stack may use (default: all of it), e.g. 79.18 to run as an H100 80GB")
    p.add_argument("--out", default=os.environ.get("OUT", ".") + "/single_gpu.json")
    p.add_argument("--child", nargs=3, metavar=("STACK", "TOKENS", "STEPS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child[0], int(args.child[1]), int(args.child[2]), args.set,
                                           args.gpu_mem)), flush=True)
        return
    if args.gpu_mem is not None and not args.gpu_mem > 0:
        p.error(f"--gpu-mem: must be a positive number of GiB, got {args.gpu_mem}")
    if args.set:  # a bad override is refused here, not after minutes of building the model in each child
        from longctx.config import ConfigError, load_recipe

        try:
            load_recipe(str(RECIPE), args.set)
        except ConfigError as e:
            p.error(f"--set: {e}")
    start, rows, failed = time.perf_counter(), [], set()
    for stack, seq_len in args.runs:
        left = args.deadline - (time.perf_counter() - start)
        if stack in failed or left < 30:
            rows.append({"stack": stack, "seq_len": seq_len, "status": "skipped",
                         "error": "after its out-of-memory" if stack in failed else "device-time deadline"})
            continue
        steps = args.steps or (2 if seq_len <= 32768 else 1)
        cmd = [sys.executable, __file__, "--child", stack, str(seq_len), str(steps), *(f"--set={o}" for o in args.set),
               *(["--gpu-mem", str(args.gpu_mem)] if args.gpu_mem is not None else [])]
        env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=left, env=env)
            found = [line[7:] for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            row = json.loads(found[-1]) if found else {
                "stack": stack, "seq_len": seq_len, "status": "crash", "error": (out.stderr.strip().splitlines() or [""])[-1][:200]}
        except subprocess.TimeoutExpired:
            row = {"stack": stack, "seq_len": seq_len, "status": "timeout", "error": f"stopped at the deadline ({left:.0f} s)"}
        row["wall_s"] = round(time.perf_counter() - start, 1)
        if row["status"] == "oom":
            failed.add(stack)
        rows.append(row)
        print(json.dumps(row), flush=True)
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()

"""Where one training step of the SmolLM2 study spends its time, full attention or S²-Attn (a diagnostic).

The study's model and recipe (yarn, LoRA with embeddings and norms trained), the planner's layout, and the
study's own windows: three that hold one document and three that hold four or more. For each window, the mean
time of three forward + backward + AdamW steps; then a torch profile of one step of each kind. The model runs
without DeepSpeed (one process, plain AdamW), so LoRA's adapters stay in float32 as peft makes them.

    python bench/s2_step_profile.py --pattern s2 --model models/smollm2-135m --out s2-profile.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from longctx.config import load_recipe  # noqa: E402
from longctx.data import build_packed  # noqa: E402
from longctx.launcher.run import job_cluster, resolve, single_process_env  # noqa: E402
from longctx.model import load_model, load_tokenizer  # noqa: E402
from longctx.train import CausalLMWithLoss  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pattern", choices=("full", "s2"), required=True)
    ap.add_argument("--model", default="models/smollm2-135m")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    single_process_env()
    recipe = load_recipe(str(ROOT / "recipes/smollm2-64k.yaml"), [
        f"model.path={args.model}", "rope.method=yarn", "lora.enabled=true", "lora.train_embeddings=true",
        "lora.train_norms=true", f"attention.train_pattern={args.pattern}"])
    run = resolve(recipe, job_cluster(torch.cuda.get_device_properties(0).total_memory), True, False, None)
    model, record = load_model(recipe, torch.device("cuda"), run.layout, None)
    model.cuda().train()
    print(args.pattern, record["changes"])
    lm = CausalLMWithLoss(model, recipe.train.loss_chunk_tokens)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    packed = build_packed(recipe.data, load_tokenizer(recipe), recipe.train.seed, tempfile.mkdtemp())
    docs = (packed.position_ids == 0).sum(1)
    windows = [int(i) for i in np.flatnonzero(docs == 1)[:3]] + [int(i) for i in np.flatnonzero(docs >= 4)[:3]]

    def step(i: int) -> None:
        row = lambda a: torch.from_numpy(a[i:i + 1].astype(np.int64)).cuda()  # noqa: E731
        loss, tokens = lm(row(packed.input_ids), row(packed.position_ids), row(packed.labels))
        (loss / tokens).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in windows:  # Triton compiles and tunes for each window's layout
        step(i)
        step(i)
    times = {}
    for i in windows:
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(3):
            step(i)
        torch.cuda.synchronize()
        times[i] = (time.perf_counter() - start) / 3
        print(f"{args.pattern} window {i} documents {int(docs[i])} step {times[i] * 1000:.0f} ms")
    for i in (windows[0], windows[3]):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step(i)
            torch.cuda.synchronize()
        print(f"--- {args.pattern} profile, window {i}, {int(docs[i])} documents")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
    with open(args.out, "w") as f:
        json.dump({"pattern": args.pattern, "device": torch.cuda.get_device_name(),
                   "step_s": {str(i): t for i, t in times.items()},
                   "documents": {str(i): int(docs[i]) for i in times}}, f, indent=1)


if __name__ == "__main__":
    main()

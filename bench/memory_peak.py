"""What is on the GPU at the peak of one training step, beside what the planner predicts.

One step of the longctx stack of bench/single_gpu.py (8B LoRA, the recipe llama3-8b-lora-1gpu)
with a checkpointing layout given as host/gpu/plain layers, bottom to top. torch's allocator
records every allocation of the step; replaying them finds the moment of the peak, and the
blocks alive then are grouped by the innermost frame in project, transformers or peft code
that allocated them. The planner's parts for the same layout are printed below.

    python bench/memory_peak.py --tokens 131072 --layout 32/0/0 --out $OUT/memory_peak.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import single_gpu  # noqa: E402  (the stack and the step of bench/single_gpu.py)

GiB = 2**30
OWN_CODE = ("/longctx/", "/kernels/", "/transformers/", "/peft/", "/bench/")


def site(frames: list[dict]) -> str:
    """The innermost frame in our, transformers' or peft's code (autograd's own allocations have none)."""
    for f in frames:
        if any(s in f["filename"] for s in OWN_CODE) and "/site-packages/torch/" not in f["filename"]:
            name = f["filename"].split("/longctx/")[-1].split("site-packages/")[-1]
            return f"{name}:{f['line']} {f['name']}"
    return f"(no frame in our code) {frames[0]['name'] if frames else ''}".rstrip()


def live_at_peak(events: list[dict], base: int) -> tuple[int, list[dict]]:
    """The peak (bytes, counting `base` allocated before recording) and the blocks alive then."""
    live, now, peak, at = {}, base, base, -1
    for i, e in enumerate(events):
        if e["action"] == "alloc":
            live[e["addr"]] = e
            now += e["size"]
            if now > peak:
                peak, at = now, i
        elif e["action"] == "free_completed" and e["addr"] in live:
            now -= live.pop(e["addr"])["size"]
    live = {}
    for e in events[:at + 1]:
        if e["action"] == "alloc":
            live[e["addr"]] = e
        elif e["action"] == "free_completed":
            live.pop(e["addr"], None)
    return peak, list(live.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=single_gpu.parse_tokens, required=True, help="sequence length, e.g. 131072 or 128k")
    p.add_argument("--layout", required=True, help="host/gpu/plain decoder layers, bottom to top, e.g. 16/16/0")
    p.add_argument("--out", default=os.environ.get("OUT", ".") + "/memory_peak.json")
    args = p.parse_args()

    import torch

    from longctx.activation_checkpointing import Layout
    from longctx.config import load_recipe
    from longctx.launcher.fit import from_recipe
    from longctx.launcher.memory_model import Cluster, estimate

    layers = json.loads((single_gpu.CONFIG_DIR / "config.json").read_text())["num_hidden_layers"]
    try:
        layout = Layout(*(int(n) for n in args.layout.split("/")))
    except (TypeError, ValueError):
        layout = None
    if layout is None or min(layout.host, layout.gpu, layout.plain) < 0 or layout.layers != layers:
        p.error(f"--layout {args.layout!r}: expected host/gpu/plain, three whole numbers >= 0 adding up to {layers}")
    model, optimizer, config, record = single_gpu.build("longctx", args.tokens, [], layout)  # not the planner's choice
    gen = torch.Generator(device="cuda").manual_seed(args.tokens)
    warm = torch.randint(0, config.vocab_size, (1, record["warmup_tokens"]), device="cuda", generator=gen)
    single_gpu.train_step("longctx", model, optimizer, warm)
    ids = torch.randint(0, config.vocab_size, (1, args.tokens), device="cuda", generator=gen)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    single_gpu.train_step("longctx", model, optimizer, ids)
    torch.cuda.synchronize()
    events = torch.cuda.memory._snapshot()["device_traces"][0]
    torch.cuda.memory._record_memory_history(enabled=None)
    peak, blocks = live_at_peak(events, base)

    groups = collections.defaultdict(lambda: [0, collections.Counter()])
    for b in blocks:
        g = groups[site(b.get("frames", []))]
        g[0] += b["size"]
        g[1][b["size"]] += 1
    rows = sorted(((name, size, sizes) for name, (size, sizes) in groups.items()), key=lambda r: -r[1])
    recipe = load_recipe(str(single_gpu.RECIPE), [f"data.seq_len={args.tokens}"])
    shape, features, settings = from_recipe(recipe)
    cluster = Cluster(gpu_mem=torch.cuda.get_device_properties(0).total_memory)
    est = estimate(shape, features, settings, cluster, args.tokens, layout)

    measured = torch.cuda.max_memory_allocated() / GiB
    print(f"{args.tokens} tokens, layout {args.layout}: max_memory_allocated {measured:.2f} GiB "
          f"(replayed {peak / GiB:.2f}), {base / GiB:.2f} GiB before the step")
    for name, size, sizes in rows:
        if size >= 2**20:
            print(f"  {size / GiB:8.3f} GiB  {name}  (blocks: " +
                  ", ".join(f"{n} x {s / 2**20:.1f} MiB" for s, n in sizes.most_common(3)) + ")")
    print(f"planner: peak {est.gpu_peak / GiB:.2f} GiB; " + ", ".join(f"{k} {v / GiB:.2f}" for k, v in est.gpu.items()))
    Path(args.out).write_text(json.dumps({
        "tokens": args.tokens, "layout": args.layout, "device": torch.cuda.get_device_name(),
        "max_allocated_gib": measured, "before_step_gib": base / GiB,
        "at_peak": [{"site": name, "gib": size / GiB, "blocks": dict(sizes)} for name, size, sizes in rows],
        "planner": est.as_dict()}, indent=1) + "\n")


if __name__ == "__main__":
    main()

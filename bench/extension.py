"""The extension study: a real model stretched past its context, method by method, before and after training.

    python bench/extension.py --model models/smollm2-135m --out out/extension                 # every row
    python bench/extension.py ... --stage base                                  # the methods without training
    python bench/extension.py ... --stage train --methods yarn --steps 50,200   # train, evaluate at each N
    python bench/extension.py ... --stage train --methods yarn --label s2-lora attention.train_pattern=s2 \
        lora.enabled=true lora.train_embeddings=true lora.train_norms=true     # rows of their own: yarn-s2-lora+N

Rows without training apply each RoPE method to the base weights at factor target / trained context
(`dynamic` is evaluation-only: its frequencies follow the length it is given). A trained row is a run of the
recipe (recipes/smollm2-64k.yaml) through `deepspeed launcher/run.py` with `rope.method=M`; the next step count
resumes the same run with a larger train.max_steps (so its cosine schedule stretches to the new end), and each
exported model is evaluated with full attention under the RoPE settings it was trained with. Same data and
seed for every row. Evaluation text: prose that no training document holds (longctx.corpus.held_out_prose).
Training rows with recipe overrides need a `--label`: it names their rows and their run directory, so that
they never resume, or replace in the table, the rows of another setting.

Results accumulate in <out>/extension.json (a later stage adds rows), with extension.md (the table),
ppl.png (perplexity against length, one line per row) and needle-<row>.png (passkey heatmaps).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from longctx.config import ConfigError, load_recipe  # noqa: E402
from longctx.evaluation import plots  # noqa: E402
from longctx.evaluation.common import load_pretrained, parse_fractions, parse_lengths, short  # noqa: E402
from longctx.evaluation.ppl import perplexity_by_length  # noqa: E402
from longctx.evaluation.reports import long_documents, needle_report  # noqa: E402
from longctx.launcher.discovery import free_port  # noqa: E402

BASE_METHODS = ["none", "linear", "ntk", "dynamic", "yarn"]
TRAIN_METHODS = ["none", "linear", "ntk", "yarn"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="imported base model directory (longctx model import)")
    p.add_argument("--out", default="out/extension", help="study directory: runs, reports, table")
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "smollm2-64k.yaml"), help="training recipe")
    p.add_argument("--stage", choices=["base", "train", "all"], default="all", help="which rows to add")
    p.add_argument("--methods", default="none,linear,ntk,yarn", help="RoPE methods (base rows also: dynamic)")
    p.add_argument("--steps", default="50,200,400", help="training steps after which a row is evaluated")
    p.add_argument("--ppl-lengths", default="2k,8k,16k,32k,64k", help="perplexity context lengths")
    p.add_argument("--needle-lengths", default="4k,8k,16k,32k,64k", help="passkey context lengths")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="passkey depths, fractions of the context")
    p.add_argument("--trials", type=int, default=5, help="passkeys per (length, depth) cell")
    p.add_argument("--label", default="", help="training rows and runs are named <method>-<label>+<steps>; "
                   "needed with overrides (e.g. s2-lora for attention.train_pattern=s2 lora.enabled=true)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides for the training runs")
    args = p.parse_args(argv)
    if args.overrides and args.stage != "base" and not args.label:
        p.error("--label: training runs with recipe overrides need a label for their rows and run directory")
    args.methods = args.methods.split(",")
    bad = [m for m in args.methods if m not in BASE_METHODS]
    if bad:
        p.error(f"--methods: {bad[0]!r} is not one of {','.join(BASE_METHODS)}")
    args.steps = sorted(int(s) for s in args.steps.split(","))
    args.ppl_lengths = parse_lengths(args.ppl_lengths, "--ppl-lengths")
    args.needle_lengths = parse_lengths(args.needle_lengths, "--needle-lengths")
    args.depths = parse_fractions(args.depths)
    return args


def evaluate(label: str, model_dir: str, rope: list[str], args: argparse.Namespace, out: Path) -> dict:
    """Perplexity by length and the passkey grid of one model (RoPE overrides applied to its config)."""
    model, tokenizer = load_pretrained(model_dir, rope)
    documents = long_documents(tokenizer, max(args.ppl_lengths), None)
    ppl = perplexity_by_length(model, documents, args.ppl_lengths)
    needle = needle_report(model, tokenizer, args.needle_lengths, args.depths, args.trials, out / "needle" / label,
                           model_name=label)
    del model
    torch.cuda.empty_cache()
    scores = torch.tensor(needle["scores"])  # [depth, length]
    return {"ppl": {str(r["length"]): r["ppl"] for r in ppl},
            "passkey": {str(n): float(scores[:, j].mean()) for j, n in enumerate(args.needle_lengths)},
            "passkey_mean": needle["mean"]}


def run_name(method: str, args: argparse.Namespace) -> str:
    return f"{method}-{args.label}" if args.label else method


def train(method: str, steps: int, args: argparse.Namespace, runs: Path) -> tuple[str, dict]:
    """Train (or continue) the recipe's run for `method` up to `steps`; returns its exported model and cost."""
    out = runs / run_name(method, args)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(free_port()),
           str(ROOT / "launcher" / "run.py"), "--config", args.recipe, f"model.path={args.model}",
           f"rope.method={method}", f"train.max_steps={steps}", f"train.out_dir={out}", "eval.at_end=[]",
           *args.overrides]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)  # CalledProcessError: main reports it and keeps the rows so far
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return str(out / "hf"), {"tokens": rows[-1]["tokens"], "train_minutes": sum(r["step_s"] for r in rows) / 60,
                             "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
                             "peak_mem_gib": max(r["peak_mem_gib"] for r in rows), "overrides": args.overrides}


def table(rows: dict, args: argparse.Namespace) -> str:
    head = ["row", "trained steps"] + [f"ppl {short(n)}" for n in args.ppl_lengths] + \
           [f"passkey {short(n)}" for n in args.needle_lengths] + ["train min", "train tok/s", "device"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in rows.items():
        ppl = [f"{r['ppl'].get(str(n)):.2f}" if r["ppl"].get(str(n)) else "-" for n in args.ppl_lengths]
        key = [f"{100 * r['passkey'][str(n)]:.0f}%" if str(n) in r["passkey"] else "-" for n in args.needle_lengths]
        cost = f"{r['train_minutes']:.1f}" if "train_minutes" in r else "-"
        speed = f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else "-"
        lines.append("| " + " | ".join([label, str(r["steps"])] + ppl + key + [cost, speed, r["device"]]) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, [f"model.path={args.model}", *args.overrides])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    original = json.loads((Path(args.model) / "config.json").read_text())["max_position_embeddings"]
    factor = recipe.data.seq_len / original
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "extension.json"
    rows = json.loads(results.read_text())["rows"] if results.exists() else {}

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"

    def record(label: str, row: dict) -> None:  # rows of one study may come from runs on different machines
        rows[label] = {**row, "device": device, "date": time.strftime("%Y-%m-%d")}
        results.write_text(json.dumps({"model": args.model, "factor": factor, "seq_len": recipe.data.seq_len,
                                       "rows": rows}, indent=2))
        print(f"{label}: ppl {row['ppl']} passkey {row['passkey_mean']:.2f}", flush=True)

    if args.stage in ("base", "all"):
        for method in [m for m in BASE_METHODS if m in args.methods or m == "dynamic"]:
            rope = [] if method == "none" else [f"rope.method={method}", f"rope.factor={factor:g}"]
            record(f"{method}", {"method": method, "steps": 0, **evaluate(method, args.model, rope, args, out)})
    failed = None
    trained = [(m, n) for m in args.methods if m in TRAIN_METHODS for n in args.steps] if args.stage != "base" else []
    for method, steps in trained:
        try:
            model_dir, cost = train(method, steps, args, out / "runs")
        except subprocess.CalledProcessError as e:
            failed = f"the training run {run_name(method, args)} to {steps} steps exited {e.returncode} " \
                     f"(its log is above)" + (f"; the rows before it are in {results}" if rows else "")
            break
        label = f"{run_name(method, args)}+{steps}"
        record(label, {"method": method, "steps": steps, **cost, **evaluate(label, model_dir, [], args, out)})
    series = {label: ([int(n) for n, v in r["ppl"].items() if v], [v for v in r["ppl"].values() if v])
              for label, r in rows.items()}
    plots.ppl_lines(series, f"{Path(args.model).name}: perplexity against length (held-out prose)",
                    str(out / "ppl.png"))
    (out / "extension.md").write_text(table(rows, args) + "\n")
    print(table(rows, args))
    if failed:
        print(f"error: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

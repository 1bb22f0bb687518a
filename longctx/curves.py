"""`longctx curves RUN_DIR [--out PNG]`: a run's loss, learning rate, tokens/s and grad norm against step.

The figure is drawn from `<out_dir>/metrics.jsonl`, so it can be drawn at any time, while the run goes on. A run
with `train.tensorboard=true` also sends each step's row to DeepSpeed's TensorBoard monitor (`log_step`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from longctx.cli import ArgParser
from longctx.config import ConfigError, Recipe

# (metrics.jsonl key, panel label, TensorBoard tag): the PNG's panels and the monitor's scalars are the same series
SERIES = [
    ("loss", "loss (per target token)", "train/loss"),
    ("lr", "learning rate", "train/lr"),
    ("tokens_per_s", "tokens/s", "train/tokens_per_s"),
    ("grad_norm", "grad norm", "train/grad_norm"),
]
REQUIRED = ("step", "loss", "lr", "tokens_per_s")
SMOOTH_FROM = 50  # steps: from here on the loss panel adds a trailing mean over the noisy per-step line


def load_rows(metrics_path: Path, name: str) -> list[dict]:
    """The complete rows of a metrics.jsonl in step order, the last written winning for a step. A running job
    may be mid-line at the end: a row it has not finished, or one without the plotted keys, is skipped."""
    by_step = {}
    for line in metrics_path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and all(isinstance(row.get(k), (int, float)) for k in REQUIRED):
            by_step[row["step"]] = row
    if not by_step:
        raise ConfigError(f"{name}: no complete rows yet (a row needs {', '.join(REQUIRED)})")
    return [by_step[s] for s in sorted(by_step)]


def trailing_mean(ys: list[float], window: int) -> np.ndarray:
    """Mean of the finite values among the last `window`: a NaN loss leaves a gap, not a window of NaNs."""
    y = np.asarray(ys, dtype=float)
    ok = np.isfinite(y)
    sums = np.concatenate([[0.0], np.cumsum(np.where(ok, y, 0.0))])
    counts = np.concatenate([[0], np.cumsum(ok)])
    end = np.arange(1, len(y) + 1)
    start = np.maximum(end - window, 0)
    n = counts[end] - counts[start]
    return np.where(n > 0, (sums[end] - sums[start]) / np.maximum(n, 1), np.nan)


def draw_curves(rows: list[dict], title: str, out_png: Path) -> Path:
    # a Figure without pyplot: no global backend to set (train.py and notebooks call this too), nothing to close
    from matplotlib.figure import Figure

    panels = [(key, label) for key, label, _ in SERIES if any(r.get(key) is not None for r in rows)]
    fig = Figure(figsize=(7, 2.1 * len(panels) + 0.6))
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (key, label) in zip(axes, panels):
        xs = [r["step"] for r in rows if r.get(key) is not None]
        ys = [float(r[key]) for r in rows if r.get(key) is not None]
        few = len(xs) <= 30
        if key == "loss" and len(xs) >= SMOOTH_FROM:
            window = max(5, len(xs) // 50)
            ax.plot(xs, ys, linewidth=0.8, alpha=0.35, label="per step")
            ax.plot(xs, trailing_mean(ys, window), linewidth=1.5, color="C0", label=f"mean of last {window} steps")
            ax.legend(fontsize=8)
        else:
            ax.plot(xs, ys, marker="o" if few else None, markersize=3, linewidth=1.2)
        finite = [y for y in ys if np.isfinite(y)]
        # an early loss or grad-norm spike would flatten the rest of the line
        if key in ("loss", "grad_norm") and finite and min(finite) > 0 and max(finite) > 10 * min(finite):
            ax.set_yscale("log")
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if key == "tokens_per_s":
            ax.set_ylim(bottom=0)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("optimizer step")
    fig.suptitle(title)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    # written beside and renamed: a viewer refreshing the PNG of a running job never reads half a file
    tmp = out_png.with_name(f".{out_png.name}.tmp")
    fig.savefig(tmp, format="png", dpi=120)
    os.replace(tmp, out_png)
    return out_png


def title_of(rows: list[dict], run_name: str) -> str:
    last = rows[-1]
    tokens = f", {last['tokens']:,} tokens" if isinstance(last.get("tokens"), int) else ""
    return f"{run_name}: step {last['step']}{tokens}"


def plot_curves(metrics_path: str | Path, out_png: str | Path) -> Path:
    """Loss, learning rate, tokens/s (and grad norm when the run logged one) against step, one PNG."""
    metrics_path, out_png = Path(metrics_path), Path(out_png)
    if not metrics_path.is_file():
        raise ConfigError(f"{metrics_path}: no such file")
    rows = load_rows(metrics_path, str(metrics_path))
    return draw_curves(rows, title_of(rows, metrics_path.resolve().parent.name), out_png)


def check_tensorboard(recipe: Recipe) -> None:
    """train.tensorboard=true needs what DeepSpeed's TensorBoardMonitor imports (deepspeed/monitor/tensorboard.py:
    `import tensorboard`, then torch.utils.tensorboard's SummaryWriter) at deepspeed.initialize, on rank 0 only;
    refuse it before anything is loaded. Importing the SummaryWriter also catches a tensorboard missing its own
    dependencies or older than torch accepts."""
    if not recipe.train.tensorboard:
        return
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as e:
        why = " ".join(str(e).split())
        raise ConfigError(f"train.tensorboard=true: DeepSpeed's TensorBoard monitor needs the `tensorboard` package, "
                          f"which does not import here ({why}); pip install tensorboard, or set "
                          f"train.tensorboard=false") from None


def log_step(engine: Any, row: dict) -> None:
    """One metrics.jsonl row to the engine's monitor (TensorBoard with train.tensorboard=true), x = optimizer step,
    tags `train/loss`, `train/lr`, `train/tokens_per_s`, `train/grad_norm`. No-op when no monitor is enabled.
    DeepSpeed's MonitorMaster writes on global rank 0 only, so every rank may call this."""
    monitor = getattr(engine, "monitor", None)
    if monitor is None or not monitor.enabled:
        return
    monitor.write_events([(tag, float(row[key]), row["step"]) for key, _, tag in SERIES if row.get(key) is not None])


def main(argv: list[str]) -> int:
    p = ArgParser(prog="longctx curves", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run's train.out_dir, finished or still running")
    p.add_argument("--out", metavar="PNG", help="where to write the figure (default RUN_DIR/curves.png)")
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"RUN_DIR {run_dir}: no such directory")
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise ConfigError(f"RUN_DIR {run_dir}: no metrics.jsonl in it (a run writes it from its first step on)")
    out = Path(args.out) if args.out else run_dir / "curves.png"
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a directory; name the PNG file")
    rows = load_rows(metrics, f"RUN_DIR {run_dir}: metrics.jsonl")
    print(draw_curves(rows, title_of(rows, run_dir.resolve().name), out))
    return 0

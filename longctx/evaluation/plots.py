"""PNG reports a person can read: a length x depth heatmap and lines of perplexity against length."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from longctx.evaluation.common import short  # noqa: E402


def heatmap(scores: np.ndarray, lengths: list[int], depths: list[float], title: str, path: str) -> None:
    """scores[depth, length] in [0, 1]."""
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 3, 0.55 * len(depths) + 2))
    image = ax.imshow(scores, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [short(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            ax.text(j, i, f"{scores[i, j]:.2f}", ha="center", va="center", fontsize=9)
    fig.colorbar(image, ax=ax, label="retrieval accuracy")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def lines(series: dict[str, tuple[list[int], list[float]]], ylabel: str, title: str, path: str) -> None:
    """One line per model or method: x = context length (log scale)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xscale("log", base=2)
    xs = sorted({x for xs, _ in series.values() for x in xs})
    ax.set_xticks(xs, [short(x) for x in xs])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bars(values: list[float], labels: list[str], ylabel: str, title: str, path: str) -> None:
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(values) + 2), 4))
    bars = ax.bar(range(len(values)), values, color="tab:blue")
    ax.bar_label(bars, [f"{v:.2f}" for v in values], padding=2)  # zeros stay visible as numbers
    ax.set_xticks(range(len(values)), labels)
    ax.set_ylim(0, 1)
    ax.set_xlabel("position of the relevant passage")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""The report figures: needle heatmap, perplexity-vs-length lines, lost-in-the-middle curves (Agg, no display)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from longctx.evaluation.common import short  # noqa: E402

# lines that coincide (a method that changes nothing) must stay visible: each gets its own marker and dash
STYLES = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", "-"), ("P", "--"), ("X", "-.")]


def heatmap(scores: np.ndarray, lengths: list[int], depths: list[float], title: str, path: str) -> None:
    """scores[depth, length] in [0, 1]: depth down, length across, as published needle charts are."""
    fig, ax = plt.subplots(figsize=(max(5.5, 1.0 * len(lengths) + 3), max(3.5, 0.5 * len(depths) + 2)))
    image = ax.imshow(scores, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [short(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth (0% = start of context)")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            value = scores[i, j]
            # the colour map is dark at both ends: white text there, black in the pale middle
            colour = "white" if value < 0.25 or value > 0.85 else "black"
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=9, color=colour)
    fig.colorbar(image, ax=ax, label="retrieval accuracy")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ppl_lines(series: dict[str, tuple[list[int], list[float]]], title: str, path: str) -> None:
    """One line per model or RoPE method; x = context length on a log scale, y log when lines are far apart."""
    many = len(series) > 10  # past the default cycle's 10 colours, 20 and the legend beside the axes
    fig, ax = plt.subplots(figsize=(9.5, 5) if many else (7, 4.5))
    colours = plt.get_cmap("tab20" if many else "tab10").colors
    for i, ((name, (xs, ys)), (marker, dash)) in enumerate(zip(series.items(), STYLES * len(series))):
        ax.plot(xs, ys, marker=marker, linestyle=dash, color=colours[i % len(colours)], label=name)
    ax.set_xscale("log", base=2)
    xs = sorted({x for xs, _ in series.values() for x in xs})
    ax.set_xticks(xs, [short(x) for x in xs])
    ax.minorticks_off()
    ys = [y for _, ys in series.values() for y in ys]
    if ys and max(ys) > 10 * min(ys):
        ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if many:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
    else:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def middle_lines(accuracy: dict[str, list[float]], title: str, path: str) -> None:
    """One line per ordering strategy: accuracy against the relevant passage's retriever rank."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (strategy, values), (marker, dash) in zip(accuracy.items(), STYLES * len(accuracy)):
        ranks = range(1, len(values) + 1)
        ax.plot(ranks, values, marker=marker, linestyle=dash,
                label=strategy if strategy != "none" else "none (rank = position)")
    k = max(len(v) for v in accuracy.values())
    ax.set_xticks(range(1, k + 1))
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("retriever rank of the relevant passage (1 = best)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(title="passage order")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""Perplexity against context length: exp(mean NLL) of the scored tokens, never materialising full logits.

Two ways to score a length L:
- last window (default): each document's first L tokens, scoring every prediction or only the
  last N (`score_last`), which then all see nearly L tokens of context;
- sliding windows (`stride` S < L): windows of L tokens every S tokens over each document's
  first max(lengths) tokens, each scoring only the tokens its predecessor did not. Every
  length then scores exactly the same tokens, so the lines differ only in the context given.
"""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

from longctx.loss import IGNORE_INDEX, causal_lm_loss


def windows(n_tokens: int, length: int, stride: int = 0, score_last: int = 0) -> list[tuple[int, int]]:
    """(start, first scored token) of each `length`-token window over a document of n_tokens >= length."""
    if not stride:
        return [(0, max(1, length - score_last) if score_last else 1)]
    if not 0 < stride < length:
        # a window's first token has nothing before it inside the window: with stride = length it is never scored
        raise ValueError(f"stride {stride} must be in 1..{length - 1} for windows of {length} tokens")
    out, scored_to, start = [], 1, 0  # token 0 has nothing before it to predict it from
    while True:
        start = min(start, n_tokens - length)  # the last window ends at the document's end, still full length
        out.append((start, scored_to))
        scored_to = start + length
        if scored_to >= n_tokens:
            return out
        start += stride


def window_labels(ids: list[int], start: int, length: int, scored_from: int) -> list[int]:
    """Shifted labels: position i predicts token start+i+1, counted from scored_from on; the last predicts nothing."""
    return [ids[t] if t >= scored_from else IGNORE_INDEX for t in range(start + 1, start + length)] + [IGNORE_INDEX]


def batch_nll(model: torch.nn.Module, rows: list[tuple[list[int], list[int]]]) -> tuple[float, int]:
    """(sum of NLL, tokens scored) over equal-length (input ids, labels) rows, in one forward."""
    device = next(model.parameters()).device
    x = torch.tensor([r[0] for r in rows], device=device)
    labels = torch.tensor([r[1] for r in rows], device=device)
    positions = torch.arange(x.shape[1], device=device).expand_as(x)
    with torch.no_grad():
        total, count = causal_lm_loss(model, x, positions, labels)
    return total.item(), int(count)


def perplexity_by_length(model: torch.nn.Module, documents: list[list[int]], lengths: list[int], score_last: int = 0,
                         stride: int = 0, batch_size: int = 4) -> list[dict]:
    """One row per length over the documents that have at least that many tokens."""
    span = max(lengths)
    rows = []
    for length in lengths:
        batch_rows = []
        usable = [d[:span] if stride else d[:length] for d in documents if len(d) >= length]
        for ids in usable:
            for start, scored_from in windows(len(ids), length, stride, score_last):
                batch_rows.append((ids[start:start + length], window_labels(ids, start, length, scored_from)))
        nll, count = 0.0, 0
        for at in tqdm(range(0, len(batch_rows), batch_size), desc=f"ppl @ {length}", leave=False):
            s, n = batch_nll(model, batch_rows[at:at + batch_size])
            nll, count = nll + s, count + n
        rows.append({"length": length, "documents": len(usable), "windows": len(batch_rows), "tokens_scored": count,
                     "nll": nll / count if count else None, "ppl": math.exp(nll / count) if count else None})
    return rows
